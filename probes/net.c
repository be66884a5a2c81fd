/* Connections: every TCP/UDP destination an agent asks for, and what became of TCP ones.
 *
 * Why cgroup sock_addr hooks: they run inside connect()/sendmsg() for every path that
 * reaches the socket layer (libc, raw syscalls, io_uring), only for sockets of the cgroups
 * they are attached to (zero cost for the rest of the node), and their return value is an
 * in-kernel verdict: 0 makes connect() fail with EPERM before a SYN is built.
 *
 * Why sock:* tracepoints for the outcome: the handshake completes or fails in softirq
 * context, where no syscall hook runs; inet_sock_set_state/inet_sk_error_report are
 * stable tracepoints with the fields we need. */

#define AT_AF_INET 2
#define AT_AF_INET6 10
#define AT_SOCK_STREAM 1
#define AT_IPPROTO_TCP 6
#define AT_IPPROTO_UDP 17
#define AT_TCP_ESTABLISHED 1
#define AT_TCP_SYN_SENT 2
#define AT_TCP_CLOSE 7

/* Destination policy, filled by tracer/kernel/maps.py from the compiled rules (policy.py).
 *
 * A destination is first given a scope (loopback/internal/metadata bit; no entry = external)
 * from `scopes`. Entries then apply per agent group (gid 0 = every agent; an agent's group
 * comes from `agent_group`):
 *  - `dst_policy`: CIDR entries, LPM over (group, address); up to AT_DST_SLOTS port/proto
 *    variants share one prefix;
 *  - `scope_policy`: address-independent entries keyed by (group, port or 0 = any port), each
 *    with a scope mask (e.g. "port 3333 to anything external");
 *  - `group_allow`: allow-list groups: a destination in the masked scopes that no allow entry
 *    matched is denied.
 * IPv4 is mapped into ::ffff:a.b.c.d so one trie holds both families. In monitor mode the
 * verdict stays "allowed" but the matching policy id is still reported. */
#define AT_DST_SLOTS 4

struct at_dst_slot {
	u32 policy_id;       /* 0 = unused slot */
	u16 port_lo;
	u16 port_hi;
	u8 proto;            /* 0 any, 6 tcp, 17 udp */
	u8 deny;             /* 1 deny; 0 explicit allow */
	u8 scope_mask;       /* 0 any scope */
	u8 pad;
};
struct at_dst_val { struct at_dst_slot s[AT_DST_SLOTS]; };
struct at_dst_key { u32 prefixlen; u8 gid[4]; u8 addr[16]; };
BPF_LPM_TRIE(dst_policy, struct at_dst_key, struct at_dst_val, 8192);
struct at_sp_key { u32 gid; u32 port; };
BPF_HASH(scope_policy, struct at_sp_key, struct at_dst_val, 8192);
/* ttl_min/ttl_max (seconds) clamp the TTL of addresses learned from DNS answers for names
 * the group allows (probes/egress.c). */
struct at_group_allow { u32 scope_mask; u32 policy_id; u32 ttl_min; u32 ttl_max; };
BPF_HASH(group_allow, u32, struct at_group_allow, 1024);
/* [0]: the AT_SCOPE_* bits no entry of the three maps above can match, in any group
 * (tracer/kernel/maps.py; it narrows this before it adds entries and widens it only after it
 * removed them). A destination whose scope is all in here is allowed with no further look-up:
 * with the default pack, every loopback and internal connect (five look-ups fewer). 0, the
 * value before userspace writes it, skips nothing. */
BPF_ARRAY(policy_free, u32, 1);

/* Egress allow-lists by DNS name (tracer/kernel/egress.py writes `name_allow`, probes/egress.c fills
 * `learned`). A name pattern is keyed by (group, FNV-1a of its lowercase text read backwards):
 * the backward hash of a name's suffix is a prefix of the backward hash of the whole name, so
 * one pass over an answer's question name checks every `*.suffix` and the exact name.
 * `learned` holds the addresses that answers for allowed names returned, per group, until
 * the answer's TTL (clamped by the group's ttl_min/ttl_max) runs out. */
#ifndef AT_LEARNED_MAX
#define AT_LEARNED_MAX 131072
#endif
#define AT_DN_EXACT 1        /* the pattern's own name */
#define AT_DN_SUBDOMAINS 2   /* `*.name`: any name with at least one more label */
struct at_dn_key { u32 gid; u32 pad; u64 hash; };
#define AT_NAME_RANGES 4     /* port ranges one name (and one learned address) may carry */
struct at_prange { u16 lo; u16 hi; u8 proto; u8 pad; };   /* lo 0 = unused slot */
struct at_dn_val { struct at_prange r[AT_NAME_RANGES]; u8 flags; u8 pad[3]; };
/* All groups together; checked before load (maps.check_fits). Not preallocated: a node without
 * an allow-list pays for the bucket array (2 MiB) only, and one with 100,000 names for those
 * names; userspace alone writes it, at start and reload, so the allocation is off the hot path. */
#define AT_NAME_ALLOW_MAX 131072
BPF_F_TABLE("hash", struct at_dn_key, struct at_dn_val, name_allow, AT_NAME_ALLOW_MAX, BPF_F_NO_PREALLOC);
struct at_learn_key { u32 gid; u8 addr[16]; };
/* the name_allow keys (of this group) of the newest two patterns that returned the address,
 * each with its own expiry: ports are those the pattern allows now, so a reload that narrows
 * or drops a name applies to what was learned for it at once */
struct at_learn_val { u64 expires_ns[2]; u64 name[2]; };
BPF_TABLE("lru_hash", struct at_learn_key, struct at_learn_val, learned, AT_LEARNED_MAX);

/* Fail-closed: the `heartbeat` map and at_tracer_dead() are in common.h (proc.c's exec hook
 * reads them too). */

static __always_inline int at_learned_ok(u32 gid, u8 *addr16, u16 port, u8 proto)
{
	struct at_learn_key lk = {};
	lk.gid = gid;
	__builtin_memcpy(lk.addr, addr16, 16);
	struct at_learn_val *lv = learned.lookup(&lk);
	if (!lv)
		return 0;
	u64 now = bpf_ktime_get_ns();
	#pragma unroll
	for (int n = 0; n < 2; n++) {
		if (lv->expires_ns[n] < now || !lv->name[n])
			continue;
		struct at_dn_key dk = {};
		dk.gid = gid;
		dk.hash = lv->name[n];
		struct at_dn_val *dv = name_allow.lookup(&dk);
		if (!dv)
			continue;
		#pragma unroll
		for (int i = 0; i < AT_NAME_RANGES; i++) {
			struct at_prange *r = &dv->r[i];
			if (r->lo && port >= r->lo && port <= r->hi && (!r->proto || r->proto == proto))
				return 1;
		}
	}
	return 0;
}
/* socket address -> the connect's header, to attribute the result (which fires in softirq
 * context where `current` is unrelated). LRU: results that never come age out.
 * The entry outlives the result (`done`) until the flow's first payload or reset: flow.c takes
 * the flow's owner from it then, so a connect that never carries a byte (a refused one, a
 * port probe) makes no flow entry at all. As many as flow.c's flow_state holds, the owner of
 * a flow that waits long for its first byte lasts as long as it did there. */
struct at_pending {
	struct at_header h;
	u64 cookie;
	u32 done;            /* the result was sent: the entry is kept for flow.c only */
	u32 flow;            /* flow.c made the flow's own entry while this one stayed */
};
BPF_TABLE("lru_hash", u64, struct at_pending, pending_conn, 65536);
/* Set between SYN_SENT->CLOSE and the error report that follows it on the same CPU
 * (tcp_done_with_error: state change first, then sk_error_report). */
struct at_closing {
	struct at_pending p;
	u64 sk;
	u16 sport;
	u16 dport;
	u32 pad;
};
BPF_PERCPU_ARRAY(closing, struct at_closing, 1);
/* UDP sendmsg runs per datagram: report each (socket, destination) once. */
struct at_udp_key { u64 cookie; u8 addr[16]; u16 port; u16 pad; u32 pad2; };
BPF_TABLE("lru_hash", struct at_udp_key, u8, udp_seen, 16384);

/* 1 = a slot matched (verdict in *deny), 0 = none */
static __always_inline int at_slots(struct at_dst_val *v, u16 port, u8 proto, u32 scope, u32 *policy, u8 *deny)
{
	#pragma unroll
	for (int i = 0; i < AT_DST_SLOTS; i++) {
		struct at_dst_slot *sl = &v->s[i];
		if (sl->policy_id == 0)
			continue;
		if (port < sl->port_lo || port > sl->port_hi)
			continue;
		if (sl->proto && sl->proto != proto)
			continue;
		if (sl->scope_mask && !(sl->scope_mask & scope))
			continue;
		*policy = sl->policy_id;
		*deny = sl->deny;
		return 1;
	}
	return 0;
}

static __always_inline u32 at_dst_verdict_at(u64 agent, u8 *addr16, u16 port, u8 proto, u32 *policy, u64 now)
{
	u32 enforce = at_cfg(AT_CFG_ENFORCE);
	struct at_scope_key sk = {};
	u32 scope = AT_SCOPE_EXTERNAL, gid = 0;
	u8 deny = 0;

	sk.prefixlen = 128;
	__builtin_memcpy(sk.addr, addr16, 16);
	u32 *sc = scopes.lookup(&sk);
	if (sc)
		scope = *sc;
	if (scope != AT_SCOPE_LOOPBACK && at_tracer_dead(now)) {
		*policy = AT_FAILCLOSED_POLICY;
		deny = 1;
		goto decided;
	}
	u32 z = 0;
	u32 *free = policy_free.lookup(&z);
	if (free && !(scope & ~*free))
		return AT_VERDICT_ALLOWED;
	u32 *g = agent_group.lookup(&agent);
	if (g)
		gid = *g;
	else
		gid = at_cfg(AT_CFG_DEFAULT_GROUP);

	#pragma unroll
	for (int gi = 0; gi < 2; gi++) {
		u32 cur = gi == 0 ? gid : 0;
		if (gi == 1 && gid == 0)
			break;
		struct at_dst_key k = {};
		k.prefixlen = 32 + 128;
		__builtin_memcpy(k.gid, &cur, 4);
		__builtin_memcpy(k.addr, addr16, 16);
		struct at_dst_val *v = dst_policy.lookup(&k);
		if (v && at_slots(v, port, proto, scope, policy, &deny))
			goto decided;
		#pragma unroll
		for (int pi = 0; pi < 2; pi++) {
			struct at_sp_key spk = {cur, pi == 0 ? port : 0};
			v = scope_policy.lookup(&spk);
			if (v && at_slots(v, port, proto, scope, policy, &deny))
				goto decided;
		}
	}
	struct at_group_allow *ga = group_allow.lookup(&gid);
	if (ga && (ga->scope_mask & scope)) {
		if (at_learned_ok(gid, addr16, port, proto))
			return AT_VERDICT_ALLOWED;
		*policy = ga->policy_id;
		deny = 1;
		goto decided;
	}
	return AT_VERDICT_ALLOWED;
decided:
	if (!deny)
		*policy = 0;     /* an explicit allow is not a policy hit */
	return deny && enforce ? AT_VERDICT_BLOCKED : AT_VERDICT_ALLOWED;
}

static __always_inline u32 at_dst_verdict(u64 agent, u8 *addr16, u16 port, u8 proto, u32 *policy)
{
	return at_dst_verdict_at(agent, addr16, port, proto, policy, 0);
}

static __always_inline int at_sock_addr(struct bpf_sock_addr *ctx, u8 op, u16 family)
{
	u64 cg = bpf_get_current_cgroup_id(), agent = cg;
	u8 addr[16] = {};
	u16 port = bpf_ntohs((u16)ctx->user_port);
	u8 proto = ctx->type == AT_SOCK_STREAM ? AT_IPPROTO_TCP : AT_IPPROTO_UDP;
	u32 policy = 0;

	/* The hook is attached to watched cgroups only; this just finds the agent. An io_uring
	 * worker or a socket passed to another cgroup still counts under the socket's cgroup. */
	at_scope(&cg, &agent);

	if (family == AT_AF_INET) {
		u32 ip = ctx->user_ip4;
		addr[10] = 0xff;
		addr[11] = 0xff;
		__builtin_memcpy(&addr[12], &ip, 4);
	} else {
		u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1], w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
		__builtin_memcpy(&addr[0], &w0, 4);
		__builtin_memcpy(&addr[4], &w1, 4);
		__builtin_memcpy(&addr[8], &w2, 4);
		__builtin_memcpy(&addr[12], &w3, 4);
	}
	u64 cookie = bpf_get_socket_cookie(ctx);

	struct at_udp_key uk = {};
	if (op == AT_OP_SENDMSG) {
		uk.cookie = cookie;
		__builtin_memcpy(uk.addr, addr, 16);
		uk.port = port;
		if (udp_seen.lookup(&uk))
			goto verdict_only;
	}

	/* one clock read for the fail-closed check, the admission, the record and its wakeup: each
	 * read is ~35 ns here, a good part of the hook's own work */
	u64 now = bpf_ktime_get_ns();
	u8 verdict = at_dst_verdict_at(agent, addr, port, proto, &policy, now);
	/* a connect a rule matched is admitted from the agent's policy bucket (common.h) */
	u64 bucket = policy || verdict == AT_VERDICT_BLOCKED ? (agent | AT_POLICY_BUCKET) : agent;
	if (!at_admit_key_at(agent, bucket, AT_EV_CONNECT, now))
		return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
	struct at_connect *e = events.ringbuf_reserve(sizeof(struct at_connect));
	if (!e) {
		at_count_drop(agent, AT_EV_CONNECT);
		return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
	}
	at_fill_header_at(&e->h, AT_EV_CONNECT, sizeof(*e), cg, agent, now);
	e->cookie = cookie;
	e->sk = (u64)ctx->sk;
	e->family = family;
	e->protocol = proto;
	e->dport = port;
	e->op = op;
	e->verdict = verdict;
	__builtin_memcpy(e->daddr, addr, 16);
	e->policy_id = policy;
	e->pad = 0;
	if (proto == AT_IPPROTO_TCP && verdict == AT_VERDICT_ALLOWED) {
		struct at_pending p = {};
		__builtin_memcpy(&p.h, &e->h, sizeof(p.h));
		p.cookie = cookie;
		u64 sk = e->sk;
		pending_conn.update(&sk, &p);
	}
	events.ringbuf_submit(e, at_wake_flags_at(now));
	if (policy && verdict != AT_VERDICT_BLOCKED)
		at_ring_doorbell();     /* a rule matched and the kernel let it through: userspace acts */
	else
		/* userspace may still match it by name (a pool or tunnel domain the agent resolved):
		 * read no later than before the batch wait grew */
		at_ring_doorbell_late();
	if (op == AT_OP_SENDMSG) {
		/* only once the record is on its way: a datagram refused by the rate limit or a full
		 * ring is reported when the destination is next used, instead of never */
		u8 one = 1;
		udp_seen.update(&uk, &one);
	}
	return verdict == AT_VERDICT_BLOCKED ? 0 : 1;

verdict_only:
	return at_dst_verdict(agent, addr, port, proto, &policy) == AT_VERDICT_BLOCKED ? 0 : 1;
}

int at_connect4(struct bpf_sock_addr *ctx) { return at_sock_addr(ctx, AT_OP_CONNECT, AT_AF_INET); }
int at_connect6(struct bpf_sock_addr *ctx) { return at_sock_addr(ctx, AT_OP_CONNECT, AT_AF_INET6); }
int at_sendmsg4(struct bpf_sock_addr *ctx) { return at_sock_addr(ctx, AT_OP_SENDMSG, AT_AF_INET); }
int at_sendmsg6(struct bpf_sock_addr *ctx) { return at_sock_addr(ctx, AT_OP_SENDMSG, AT_AF_INET6); }

/* A connect's result record, all but its addresses, reserved in the ring with the connect's own
 * header (NULL: the ring is full, the drop counted). Both result paths use it: the state-change
 * tracepoint below and listen.c's sock_ops program. */
static __always_inline struct at_conn_result *at_result_reserve(struct at_pending *p, u64 sk, u16 family,
								 u16 sport, u16 dport, u16 result, s32 err)
{
	struct at_conn_result *r = events.ringbuf_reserve(sizeof(struct at_conn_result));
	if (!r) {
		at_count_drop(p->h.agent_cgroup_id, AT_EV_CONN_RESULT);
		return 0;
	}
	__builtin_memcpy(&r->h, &p->h, sizeof(r->h));
	r->h.type = AT_EV_CONN_RESULT;
	r->h.size = sizeof(*r);
	r->h.ktime = bpf_ktime_get_ns();
	r->sk = sk;
	r->family = family;
	r->sport = sport;
	r->dport = dport;
	r->result = result;
	r->error = err;
	r->pad = 0;
	return r;
}

static __always_inline void at_emit_result(struct at_pending *p, u64 sk, u16 family, u16 sport, u16 dport,
					   u8 *saddr4, u8 *daddr4, u8 *saddr6, u8 *daddr6, u16 result, s32 err)
{
	struct at_conn_result *r = at_result_reserve(p, sk, family, sport, dport, result, err);
	if (!r)
		return;
	if (family == AT_AF_INET) {
		__builtin_memset(r->saddr, 0, 16);
		__builtin_memset(r->daddr, 0, 16);
		r->saddr[10] = r->saddr[11] = 0xff;
		r->daddr[10] = r->daddr[11] = 0xff;
		bpf_probe_read_kernel(&r->saddr[12], 4, saddr4);
		bpf_probe_read_kernel(&r->daddr[12], 4, daddr4);
	} else {
		bpf_probe_read_kernel(r->saddr, 16, saddr6);
		bpf_probe_read_kernel(r->daddr, 16, daddr6);
	}
	events.ringbuf_submit(r, at_wake_flags_at(r->h.ktime));
}

/* What becomes of a connect: SYN_SENT to ESTABLISHED (the result goes out) or to CLOSE (the
 * error report that follows names the error). With the listen feature, whose sock_ops program
 * runs for agent sockets only, that program asks the kernel for the state changes of the
 * sockets connect() made here and handles them (listen.c at_sockops_result): this tracepoint
 * fires for every TCP state change of the machine, ~8 per loopback connection, each a program
 * run. Without listen it is the way. */
#ifndef AT_WITH_LISTEN
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	/* most transitions of the machine's sockets are not from SYN_SENT: that test first */
	if (args->oldstate != AT_TCP_SYN_SENT || args->protocol != AT_IPPROTO_TCP)
		return 0;
	u64 sk = (u64)args->skaddr;
	struct at_pending *p = pending_conn.lookup(&sk);
	if (!p || p->done)
		return 0;
	if (args->newstate == AT_TCP_ESTABLISHED) {
		at_emit_result(p, sk, args->family, args->sport, args->dport,
			       (u8 *)args->saddr, (u8 *)args->daddr, (u8 *)args->saddr_v6, (u8 *)args->daddr_v6,
			       AT_RESULT_ESTABLISHED, 0);
#if defined(AT_WITH_FLOW) && !defined(AT_SKB_NO_CURRENT)
		p->done = 1;    /* flow.c deletes it */
#else
		pending_conn.delete(&sk);
#endif
	} else if (args->newstate == AT_TCP_CLOSE) {
		u32 zero = 0;
		struct at_closing *c = closing.lookup(&zero);
		if (c) {
			__builtin_memcpy(&c->p, p, sizeof(*p));
			c->sk = sk;
			c->sport = args->sport;
			c->dport = args->dport;
		}
		pending_conn.delete(&sk);
	}
	return 0;
}
#endif

TRACEPOINT_PROBE(sock, inet_sk_error_report)
{
	u32 zero = 0;
	struct at_closing *c = closing.lookup(&zero);
	if (!c || c->sk == 0 || c->sport != args->sport || c->dport != args->dport)
		return 0;
	/* ECONNREFUSED is 111 on every Linux architecture agenttrace supports */
	at_emit_result(&c->p, c->sk, args->family, args->sport, args->dport,
		       (u8 *)args->saddr, (u8 *)args->daddr, (u8 *)args->saddr_v6, (u8 *)args->daddr_v6,
		       args->error == 111 ? AT_RESULT_REFUSED : AT_RESULT_ERROR, args->error);
	c->sk = 0;
	return 0;
}

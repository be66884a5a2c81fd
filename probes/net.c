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

/* Destination policy (enforce mode), filled by the loader from rules and config.
 * LPM key: agent cgroup id, destination port, address; an entry's prefix covers the agent
 * and port bytes fully (or the port is 0 = any) plus the address prefix. IPv4 is mapped into
 * ::ffff:a.b.c.d so one trie holds both families. Agent 0 = every agent. */
struct at_dst_key {
	u32 prefixlen;
	u8 agent[8];         /* little-endian cgroup id */
	u8 port[2];          /* network order; 0 = any port */
	u8 addr[16];
};
struct at_dst_val {
	u32 policy_id;
	u8 proto;            /* 0 = any, 6 tcp, 17 udp */
	u8 deny;             /* 1 deny; 0 an explicit allow (exception / allow-list entry) */
	u16 pad;
};
BPF_LPM_TRIE(dst_policy, struct at_dst_key, struct at_dst_val, 8192);
/* [0] enforce flag */
BPF_ARRAY(net_config, u32, 1);
/* Agents in allow-list mode: anything not explicitly allowed is denied; value = policy id. */
BPF_HASH(allowlist_agents, u64, u32, 1024);

/* socket address -> the connect's header, to attribute the result (which fires in softirq
 * context where `current` is unrelated). LRU: results that never come age out. */
struct at_pending {
	struct at_header h;
	u64 cookie;
};
BPF_TABLE("lru_hash", u64, struct at_pending, pending_conn, 16384);
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

static __always_inline u32 at_dst_verdict(u64 agent, u8 *addr16, u16 port, u8 proto, u32 *policy)
{
	u32 zero = 0;
	u32 *enf = net_config.lookup(&zero);
	u32 enforce = enf ? *enf : 0;
	struct at_dst_key k = {};
	struct at_dst_val *v;

	/* most specific first: this agent before every agent, this port before any port */
	#pragma unroll
	for (int i = 0; i < 4; i++) {
		u64 a = i < 2 ? agent : 0;
		u16 p = (i & 1) ? 0 : bpf_htons(port);
		k.prefixlen = (8 + 2 + 16) * 8;
		__builtin_memcpy(k.agent, &a, 8);
		__builtin_memcpy(k.port, &p, 2);
		__builtin_memcpy(k.addr, addr16, 16);
		v = dst_policy.lookup(&k);
		if (v && (v->proto == 0 || v->proto == proto)) {
			*policy = v->policy_id;
			if (!v->deny)
				return AT_VERDICT_ALLOWED;
			return enforce ? AT_VERDICT_BLOCKED : AT_VERDICT_ALLOWED;
		}
	}
	u32 *al = allowlist_agents.lookup(&agent);
	if (al) {
		*policy = *al;
		return enforce ? AT_VERDICT_BLOCKED : AT_VERDICT_ALLOWED;
	}
	return AT_VERDICT_ALLOWED;
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

	if (op == AT_OP_SENDMSG) {
		struct at_udp_key uk = {};
		u8 one = 1;
		uk.cookie = cookie;
		__builtin_memcpy(uk.addr, addr, 16);
		uk.port = port;
		if (udp_seen.lookup(&uk))
			goto verdict_only;
		udp_seen.update(&uk, &one);
	}

	u8 verdict = at_dst_verdict(agent, addr, port, proto, &policy);
	struct at_connect *e = events.ringbuf_reserve(sizeof(struct at_connect));
	if (!e) {
		at_count_drop(agent, AT_EV_CONNECT);
		return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
	}
	at_fill_header(&e->h, AT_EV_CONNECT, sizeof(*e), cg, agent);
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
	events.ringbuf_submit(e, 0);
	return verdict == AT_VERDICT_BLOCKED ? 0 : 1;

verdict_only:
	return at_dst_verdict(agent, addr, port, proto, &policy) == AT_VERDICT_BLOCKED ? 0 : 1;
}

int at_connect4(struct bpf_sock_addr *ctx) { return at_sock_addr(ctx, AT_OP_CONNECT, AT_AF_INET); }
int at_connect6(struct bpf_sock_addr *ctx) { return at_sock_addr(ctx, AT_OP_CONNECT, AT_AF_INET6); }
int at_sendmsg4(struct bpf_sock_addr *ctx) { return at_sock_addr(ctx, AT_OP_SENDMSG, AT_AF_INET); }
int at_sendmsg6(struct bpf_sock_addr *ctx) { return at_sock_addr(ctx, AT_OP_SENDMSG, AT_AF_INET6); }

static __always_inline void at_emit_result(struct at_pending *p, u64 sk, u16 family, u16 sport, u16 dport,
					   u8 *saddr4, u8 *daddr4, u8 *saddr6, u8 *daddr6, u16 result, s32 err)
{
	struct at_conn_result *r = events.ringbuf_reserve(sizeof(struct at_conn_result));
	if (!r) {
		at_count_drop(p->h.agent_cgroup_id, AT_EV_CONN_RESULT);
		return;
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
	events.ringbuf_submit(r, 0);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
	if (args->protocol != AT_IPPROTO_TCP || args->oldstate != AT_TCP_SYN_SENT)
		return 0;
	u64 sk = (u64)args->skaddr;
	struct at_pending *p = pending_conn.lookup(&sk);
	if (!p)
		return 0;
	if (args->newstate == AT_TCP_ESTABLISHED) {
		at_emit_result(p, sk, args->family, args->sport, args->dport,
			       (u8 *)args->saddr, (u8 *)args->daddr, (u8 *)args->saddr_v6, (u8 *)args->daddr_v6,
			       AT_RESULT_ESTABLISHED, 0);
		pending_conn.delete(&sk);
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

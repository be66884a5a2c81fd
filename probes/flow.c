/* Flows: the first payload bytes of each TCP flow of an agent socket, each way, once.
 *
 * Why cgroup_skb: the programs run only for sockets of the cgroups they are attached to (agent
 * cgroups), so other workloads pay nothing; they see every TCP segment of those sockets
 * whatever the port, the process name or the library; and their return value drops the packet
 * (0) — which is how a forbidden protocol is stopped before its handshake reaches the peer.
 *
 * Per flow (socket cookie) one LRU entry remembers which directions were captured, whether
 * the flow is blocked, and the task that owned the socket when it was last seen in process
 * context (the SYN of connect(), the first send of an accepted socket): ingress runs in
 * softirq, where the current task is unrelated, so the owner recorded earlier names it.
 *
 * Reads only UAPI (`__sk_buff`) and packet bytes via bpf_skb_load_bytes. */

#define AT_NEXTHDR_TCP 6


/* Protocol policy: tracer/policy.py compiles rules with `on: flow` + `action: block` into
 * ProtocolDrop entries (group, protocol, scope mask, remote port range); the writer puts them
 * here keyed by (agent group, AT_PROTO_*), up to AT_FLOW_SLOTS variants per key. Group 0 =
 * every agent. Scopes, agent groups and the enforce flag are the ones net.c uses (common.h),
 * so one writer fills them for both. In monitor mode nothing is dropped. */
#define AT_FLOW_SLOTS 4
struct at_flow_slot {
	u32 policy_id;       /* 0 = unused slot */
	u16 port_lo;         /* remote port range, host order, inclusive */
	u16 port_hi;
	u8 scope_mask;       /* AT_SCOPE_* bits of the remote address; 0 = any */
	u8 pad[3];
};
struct at_flow_pkey {
	u32 gid;
	u32 proto;           /* AT_PROTO_* */
};
struct at_flow_pval {
	struct at_flow_slot s[AT_FLOW_SLOTS];
};
BPF_HASH(flow_policy, struct at_flow_pkey, struct at_flow_pval, 1024);

struct at_flow_state {
	struct at_header owner;  /* valid when owner_known */
	u8 seen[2];              /* per AT_DIR_*: first payload captured */
	u8 blocked;
	u8 owner_known;
	u32 policy_id;
};
BPF_TABLE("lru_hash", u64, struct at_flow_state, flow_state, 65536);

/* Scratch record: classified before it is copied to the ring buffer, so a failed reserve
 * never changes a verdict. */
BPF_PERCPU_ARRAY(flow_scratch, struct at_flow, 1);

/* bytes of `needle` found in the first `len` bytes of d (bounded: once per flow and way) */
static __always_inline int at_has8(const u8 *d, u32 len, u64 needle)
{
	for (u32 i = 0; i + 8 <= AT_FLOW_BYTES; i++) {
		if (i + 8 > len)
			return 0;
		u64 w;
		__builtin_memcpy(&w, &d[i], 8);
		if (w == needle)
			return 1;
	}
	return 0;
}

/* Cheap kernel-side guess; userspace (agenttrace.protocols) does the real parse. */
static __always_inline u32 at_classify(const u8 *d, u32 len)
{
	if (len >= 4 && d[0] == 'S' && d[1] == 'S' && d[2] == 'H' && d[3] == '-')
		return AT_PROTO_SSH;
	if (len >= 6 && d[0] == 0x16 && d[1] == 0x03 && d[5] == 0x01)
		return AT_PROTO_TLS;
	if (len >= 2 && d[0] == '{') {
		/* "mining. / "login" as little-endian u64 words */
		u64 mining = 0x2e676e696e696d22ULL;   /* "mining. */
		u64 login = 0x226e69676f6c22ULL;      /* "login" + next byte masked below */
		if (at_has8(d, len, mining))
			return AT_PROTO_STRATUM;
		for (u32 i = 0; i + 8 <= AT_FLOW_BYTES; i++) {
			if (i + 8 > len)
				break;
			u64 w;
			__builtin_memcpy(&w, &d[i], 8);
			if ((w & 0x00ffffffffffffffULL) == login)
				return AT_PROTO_STRATUM;
		}
		return AT_PROTO_UNKNOWN;
	}
	if (len >= 4) {
		u32 w;
		__builtin_memcpy(&w, d, 4);
		/* request methods by their first four bytes, little-endian */
		if (w == 0x20544547 /* "GET " */ || w == 0x54534f50 /* POST */ || w == 0x20545550 /* "PUT " */ ||
		    w == 0x44414548 /* HEAD */ || w == 0x4e4e4f43 /* CONN */ || w == 0x454c4544 /* DELE */ ||
		    w == 0x4954504f /* OPTI */ || w == 0x43544150 /* PATC */ || w == 0x50545448 /* HTTP */ ||
		    w == 0x20495250 /* "PRI " */)
			return AT_PROTO_HTTP;
	}
	return AT_PROTO_UNKNOWN;
}

static __always_inline u32 at_flow_verdict(u64 agent, u32 proto, const u8 *remote, u16 rport, u32 *policy)
{
	if (proto == AT_PROTO_UNKNOWN || proto == AT_PROTO_TLS || proto == AT_PROTO_HTTP)
		return AT_VERDICT_ALLOWED;  /* only ssh and stratum can be forbidden in the kernel */
	if (!at_cfg(AT_CFG_ENFORCE))
		return AT_VERDICT_ALLOWED;
	struct at_scope_key sk = {};
	sk.prefixlen = 128;
	__builtin_memcpy(sk.addr, remote, 16);
	u32 *sc = scopes.lookup(&sk);
	u32 scope = sc ? *sc : AT_SCOPE_EXTERNAL;
	u32 *g = agent_group.lookup(&agent);
	u32 gid = g ? *g : 0;
	struct at_flow_pkey k = {};
	k.proto = proto;
	#pragma unroll
	for (int gi = 0; gi < 2; gi++) {
		if (gi == 1 && gid == 0)
			break;
		k.gid = gi == 0 ? gid : 0;
		struct at_flow_pval *v = flow_policy.lookup(&k);
		if (!v)
			continue;
		#pragma unroll
		for (int i = 0; i < AT_FLOW_SLOTS; i++) {
			struct at_flow_slot *sl = &v->s[i];
			if (sl->policy_id == 0 || rport < sl->port_lo || rport > sl->port_hi)
				continue;
			if (sl->scope_mask && !(sl->scope_mask & scope))
				continue;
			*policy = sl->policy_id;
			return AT_VERDICT_BLOCKED;
		}
	}
	return AT_VERDICT_ALLOWED;
}

static __always_inline int at_flow(struct __sk_buff *skb, u8 dir)
{
	u64 cookie = bpf_get_socket_cookie(skb);
	struct at_flow_state *st = flow_state.lookup(&cookie);
	/* The steady state of a flow (both ways captured, not blocked) costs one hash lookup per
	 * packet: no cgroup walk, no header parsing. */
	if (st && st->seen[0] && st->seen[1] && !st->blocked)
		return 1;

	u64 cg = 0, agent = 0;
	struct at_l3 l;
	if (at_skb_l3(skb, &l) < 0 || l.proto != AT_NEXTHDR_TCP)
		return 1;
	if (!at_skb_scope(skb, &cg, &agent))
		return 1;
	u8 tcph[20];
	if (bpf_skb_load_bytes(skb, l.l4off, tcph, 20) < 0)
		return 1;
	u32 doff = (tcph[12] >> 4) * 4;
	u32 off = l.l4off + doff;
	u32 plen = l.l3end > off ? l.l3end - off : 0;

	if (!st) {
		struct at_flow_state fresh = {};
		flow_state.update(&cookie, &fresh);
		st = flow_state.lookup(&cookie);
		if (!st)
			return 1;
	}
	if (!st->owner_known && dir == AT_DIR_EGRESS &&
	    at_skb_header(&st->owner, AT_EV_FLOW, sizeof(struct at_flow), cg, agent))
		st->owner_known = 1;
	if (plen == 0)
		return 1;  /* SYN, pure ACK, FIN: a blocked flow may still close */
	if (st->blocked)
		return 0;  /* every retransmission and every later segment of a blocked flow */
	if (st->seen[dir & 1])
		return 1;
	st->seen[dir & 1] = 1;

	u32 zero = 0;
	struct at_flow *e = flow_scratch.lookup(&zero);
	if (!e)
		return 1;
	if (st->owner_known) {
		__builtin_memcpy(&e->h, &st->owner, sizeof(e->h));
		e->h.ktime = bpf_ktime_get_ns();
		e->h.type = AT_EV_FLOW;
		e->h.size = sizeof(*e);
	} else {
		at_skb_header(&e->h, AT_EV_FLOW, sizeof(*e), cg, agent);
	}
	e->cookie = cookie;
	e->family = l.family;
	e->sport = ((u16)tcph[0] << 8) | tcph[1];
	e->dport = ((u16)tcph[2] << 8) | tcph[3];
	e->direction = dir;
	__builtin_memcpy(e->saddr, l.saddr, 16);
	__builtin_memcpy(e->daddr, l.daddr, 16);
	u32 n = plen > AT_FLOW_BYTES ? AT_FLOW_BYTES : plen;
	/* plen > 0 here, so this is n again, in a form the verifier can bound to [1, 256] */
	n = ((n - 1) & (AT_FLOW_BYTES - 1)) + 1;
	e->len = n;
	if (bpf_skb_load_bytes(skb, off, e->data, n) < 0) {
		e->len = 0;
		n = 0;
	}
	/* classify from a re-read length: every path reaches the scan with the same state, so
	 * the verifier walks it once instead of once per path */
	e->proto_hint = at_classify(e->data, *(volatile u32 *)&e->len);
	u32 policy = 0;
	/* the remote end is the destination of egress and the source of ingress */
	e->verdict = dir == AT_DIR_EGRESS ? at_flow_verdict(agent, e->proto_hint, l.daddr, e->dport, &policy)
					  : at_flow_verdict(agent, e->proto_hint, l.saddr, e->sport, &policy);
	if (e->verdict == AT_VERDICT_BLOCKED) {
		st->blocked = 1;
		st->policy_id = policy;
	}
	if (events.ringbuf_output(e, sizeof(*e), at_wake_flags()) < 0)
		at_count_drop(agent, AT_EV_FLOW);
	return e->verdict == AT_VERDICT_BLOCKED ? 0 : 1;
}

int at_skb_egress(struct __sk_buff *skb) { return at_flow(skb, AT_DIR_EGRESS); }
int at_skb_ingress(struct __sk_buff *skb) { return at_flow(skb, AT_DIR_INGRESS); }

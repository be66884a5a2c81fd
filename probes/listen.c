/* Listeners: TCP sockets an agent puts into LISTEN (local forwards, SOCKS proxies, bind
 * shells) and the inbound connections they accept.
 *
 * Why a cgroup sock_ops program rather than sock:inet_sock_set_state: sock_ops runs only for
 * sockets of the cgroups it is attached to (zero cost elsewhere, no per-event cgroup walk on
 * every TCP state change of the node), it is called for listen() in the caller's process
 * context (BPF_SOCK_OPS_TCP_LISTEN_CB: pid, comm and cgroup are the listener's), and for each
 * accepted connection (BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) with the child socket, whose
 * cookie ties the later flow/dns records to it. The tracepoint fires for every socket of the
 * machine and, for accepted connections, in softirq with an unrelated current task. For the
 * same reason this program also takes net.c's connect results where both are loaded
 * (at_sockops_result), and that tracepoint is then not loaded at all.
 *
 * An accepted connection runs in softirq, so its record carries the listener's identity,
 * remembered at listen() per (network namespace, family, port). Listeners opened before the
 * probes were attached are not known and their accepts are not reported. UDP "listeners"
 * (bind without listen) are not covered here. */

#define AT_LSN_AF_INET 2
#define AT_LSN_AF_INET6 10
#define AT_LSN_IPPROTO_TCP 6

struct at_listener_key {
	u64 netns;
	u16 family;
	u16 port;            /* host order */
	u32 pad;
};
BPF_TABLE("lru_hash", struct at_listener_key, struct at_header, listeners, 8192);

static __always_inline void at_sockops_addrs(struct bpf_sock_ops *ctx, u16 family, u8 *laddr, u8 *raddr)
{
	__builtin_memset(laddr, 0, 16);
	__builtin_memset(raddr, 0, 16);
	if (family == AT_LSN_AF_INET) {
		u32 l = ctx->local_ip4, r = ctx->remote_ip4;
		laddr[10] = laddr[11] = 0xff;
		raddr[10] = raddr[11] = 0xff;
		__builtin_memcpy(&laddr[12], &l, 4);
		__builtin_memcpy(&raddr[12], &r, 4);
	} else {
		u32 w;
		w = ctx->local_ip6[0]; __builtin_memcpy(&laddr[0], &w, 4);
		w = ctx->local_ip6[1]; __builtin_memcpy(&laddr[4], &w, 4);
		w = ctx->local_ip6[2]; __builtin_memcpy(&laddr[8], &w, 4);
		w = ctx->local_ip6[3]; __builtin_memcpy(&laddr[12], &w, 4);
		w = ctx->remote_ip6[0]; __builtin_memcpy(&raddr[0], &w, 4);
		w = ctx->remote_ip6[1]; __builtin_memcpy(&raddr[4], &w, 4);
		w = ctx->remote_ip6[2]; __builtin_memcpy(&raddr[8], &w, 4);
		w = ctx->remote_ip6[3]; __builtin_memcpy(&raddr[12], &w, 4);
	}
}

#ifdef AT_WITH_NET
/* Connect results for net.c (see there, before its inet_sock_set_state fallback): a socket that
 * net.c's connect hook let through (its pending_conn entry) asks at BPF_SOCK_OPS_TCP_CONNECT_CB,
 * in connect(), for its state changes; the first one out of SYN_SENT sends the result
 * (ESTABLISHED) or leaves the closing note for the error report (CLOSE), as the tracepoint did,
 * and stops them. So a connection makes one more sock_ops run instead of ~8 tracepoint runs,
 * and other sockets of the machine none. The kernel calls this just before the state is
 * stored, where the tracepoint fired; ports and addresses are the socket's still. */
static __always_inline void at_sockops_result(struct bpf_sock_ops *ctx, u32 op)
{
	struct bpf_sock *s = ctx->sk;
	if (!s)
		return;
	u64 sk = (u64)s;
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		/* asked for without looking the socket up: nearly every connect() here is one
		 * net.c let through (a blocked one never gets here), so the look-up is made once,
		 * at the state change, and a socket it finds nothing for stops the callbacks there */
		bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		return;
	}
	/* the first change after connect() is the one out of SYN_SENT: whatever it is, no later
	 * one is wanted (a simultaneous open's SYN_RECV has no result here), so a change that is
	 * not a result, or of a socket net.c did not let through, stops the callbacks */
	u32 newstate = ctx->args[1];
	struct at_pending *p = 0;
	if (ctx->args[0] == AT_TCP_SYN_SENT && (newstate == AT_TCP_ESTABLISHED || newstate == AT_TCP_CLOSE))
		p = pending_conn.lookup(&sk);
	if (!p || p->done) {
		bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
		return;
	}
	u16 family = (u16)ctx->family;
	u16 sport = (u16)ctx->local_port;
	u16 dport = (u16)bpf_ntohl(ctx->remote_port);
	if (newstate == AT_TCP_CLOSE) {
		u32 zero = 0;
		struct at_closing *c = closing.lookup(&zero);
		if (c) {
			__builtin_memcpy(&c->p, p, sizeof(*p));
			c->sk = sk;
			c->sport = sport;
			c->dport = dport;
		}
		pending_conn.delete(&sk);
		return;
	}
	/* established: no later change is wanted (a closed socket makes none; a new connect asks
	 * again) */
	bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
	struct at_conn_result *r = at_result_reserve(p, sk, family, sport, dport, AT_RESULT_ESTABLISHED, 0);
	if (r) {
		at_sockops_addrs(ctx, family, r->saddr, r->daddr);
		events.ringbuf_submit(r, at_wake_flags_at(r->h.ktime));
	}
#if defined(AT_WITH_FLOW) && !defined(AT_SKB_NO_CURRENT)
	p->done = 1;    /* flow.c deletes it */
#else
	pending_conn.delete(&sk);
#endif
}
#endif

static __always_inline void at_emit_listen(struct bpf_sock_ops *ctx, struct at_header *h, u8 what, u16 family)
{
	struct at_listen *e = events.ringbuf_reserve(sizeof(struct at_listen));
	if (!e) {
		at_count_drop(h->agent_cgroup_id, AT_EV_LISTEN);
		return;
	}
	__builtin_memcpy(&e->h, h, sizeof(e->h));
	e->h.type = AT_EV_LISTEN;
	e->h.size = sizeof(*e);
	e->h.ktime = bpf_ktime_get_ns();
	e->cookie = bpf_get_socket_cookie(ctx);
	e->family = family;
	e->protocol = AT_LSN_IPPROTO_TCP;
	e->lport = (u16)ctx->local_port;
	/* remote_port holds the network-order port in its upper 16 bits on little-endian hosts */
	e->rport = what == AT_LISTEN_ACCEPT ? (u16)bpf_ntohl(ctx->remote_port) : 0;
	e->what = what;
	__builtin_memset(e->pad, 0, sizeof(e->pad));
	at_sockops_addrs(ctx, family, e->laddr, e->raddr);
	if (what == AT_LISTEN_LISTEN)
		__builtin_memset(e->raddr, 0, 16);
	events.ringbuf_submit(e, at_wake_flags());
}

int at_sockops(struct bpf_sock_ops *ctx)
{
	u32 op = ctx->op;
#ifdef AT_WITH_NET
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB || op == BPF_SOCK_OPS_STATE_CB) {
		at_sockops_result(ctx, op);
		return 1;
	}
#endif
	/* of the ~9 callbacks a loopback connection makes, two are wanted: the op is a field of the
	 * callback's own context, the family a read of the socket, so the op decides first */
	if (op != BPF_SOCK_OPS_TCP_LISTEN_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	u16 family = (u16)ctx->family;
	if (family != AT_LSN_AF_INET && family != AT_LSN_AF_INET6)
		return 1;

	if (op == BPF_SOCK_OPS_TCP_LISTEN_CB) {
		u64 cg = 0, agent = 0;
		struct at_header h = {};
		if (!at_scope(&cg, &agent))
			return 1;  /* listen() called by a task outside the watched cgroups on an agent socket */
		at_fill_header(&h, AT_EV_LISTEN, sizeof(struct at_listen), cg, agent);
		struct at_listener_key k = {};
		k.netns = bpf_get_netns_cookie(ctx);
		k.family = family;
		k.port = (u16)ctx->local_port;
		listeners.update(&k, &h);
		at_emit_listen(ctx, &h, AT_LISTEN_LISTEN, family);
	} else if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		struct at_listener_key k = {};
		k.netns = bpf_get_netns_cookie(ctx);
		k.family = family;
		k.port = (u16)ctx->local_port;
		struct at_header *h = listeners.lookup(&k);
		if (!h && family == AT_LSN_AF_INET) {
			/* an IPv4 peer on a dual-stack [::] listener arrives as AF_INET6 (v4-mapped);
			 * a plain AF_INET child may still belong to an AF_INET6 listener on older kernels */
			k.family = AT_LSN_AF_INET6;
			h = listeners.lookup(&k);
		}
		if (h)
			at_emit_listen(ctx, h, AT_LISTEN_ACCEPT, family);
	}
	return 1;
}

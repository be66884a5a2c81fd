/* ICMP echo from agent sockets (feature "icmp", needs "net": the destination policy it applies).
 * A file of its own, apart from the DNS learner in egress.c: every session needs to see pings
 * (scan windows count a sweep), while the learner is loaded only where an allow-list is
 * configured — its verifier cost is most of a second at every start. */
#ifndef AT_WITH_NET
#error "feature icmp needs net (at_dst_verdict)"
#endif

/* ICMP echo requests from agent sockets (ping sockets, and raw ones where they are not fenced):
 * no sock_addr hook sees them, so the egress skb hook reports each (socket, destination) once as
 * a connect record (op AT_OP_ICMP, port 0) -- scan windows count a ping sweep like a port scan --
 * and applies the destination policy: denied in enforce mode, the packet is dropped and the
 * send fails with EPERM. */
struct at_icmp_key { u64 cookie; u8 addr[16]; };
BPF_TABLE("lru_hash", struct at_icmp_key, u8, icmp_seen, 16384);

/* Run by skb.c's egress program with the headers it parsed; returns this concern's verdict. */
static __always_inline int at_icmp_egress(struct __sk_buff *skb, struct at_skb_ctx *c)
{
	struct at_l3 l3;
	const struct at_l3 *lp = &l3;
	if (AT_SKB_L3(skb, c, &l3) < 0)
		return 1;
	if (AT_SKB_L4LEN(skb) < 1)
		return 1;
	u8 type = c->l4[0];
	if (lp->proto == 1) {
		if (type != 8)
			return 1;
	} else if (lp->proto == 58) {
		if (type != 128)
			return 1;
	} else {
		return 1;
	}
	u64 cg = 0, agent = 0;
	if (!at_skb_scope_c(skb, &cg, &agent))
		return 1;
	u32 policy = 0;
	u8 verdict = at_dst_verdict(agent, lp->daddr, 0, lp->proto, &policy);
	struct at_icmp_key ik = {};
	ik.cookie = c->cookie;
	__builtin_memcpy(ik.addr, lp->daddr, 16);
	if (icmp_seen.lookup(&ik))
		return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
	if (!at_admit(agent, AT_EV_CONNECT))
		return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
	struct at_connect *e = events.ringbuf_reserve(sizeof(struct at_connect));
	if (!e) {
		at_count_drop(agent, AT_EV_CONNECT);
		return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
	}
	at_skb_header(&e->h, AT_EV_CONNECT, sizeof(*e), cg, agent);
	e->cookie = ik.cookie;
	e->sk = 0;
	e->family = lp->family;
	e->protocol = lp->proto;
	e->dport = 0;
	e->op = AT_OP_ICMP;
	e->verdict = verdict;
	__builtin_memcpy(e->daddr, lp->daddr, 16);
	e->policy_id = policy;
	e->pad = 0;
	events.ringbuf_submit(e, at_wake_flags());
	u8 one = 1;
	icmp_seen.update(&ik, &one);
	return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
}

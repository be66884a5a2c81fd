/* DNS: every DNS message an agent socket sends or receives on port 53, UDP or TCP, whichever
 * resolver path produced it (glibc, a Python resolver, dig, a static binary): cgroup_skb sees
 * the packets of agent sockets, so no per-library hook is needed and nothing else pays.
 *
 * The message (up to AT_DNS_MAX bytes; for TCP including the 2-byte length prefix) goes to
 * userspace, which parses it with dnspython (agenttrace.dns). Answers feed the per-agent name
 * cache. Never drops: DNS policy is decided on names, in userspace. Run by skb.c's program of
 * each direction.
 *
 * The skb helpers (at_skb_scope_c, at_skb_header, at_l3_parse) are in common.h. */

#define AT_NEXTHDR_TCP 6
#define AT_NEXTHDR_UDP 17
#define AT_DNS_PORT 53


BPF_PERCPU_ARRAY(dns_scratch, struct at_dns, 1);

/* Run by skb.c's program of each way with the headers it parsed. Never drops. */
static __always_inline void at_dns(struct __sk_buff *skb, u8 dir, struct at_skb_ctx *c)
{
	struct at_l3 l3;
	const struct at_l3 *lp = &l3;
	if (AT_SKB_L3(skb, c, &l3) < 0)
		return;
	/* ports first, the cgroup walk only for port-53 packets: most packets are not DNS */
	if (lp->proto != AT_NEXTHDR_UDP && lp->proto != AT_NEXTHDR_TCP)
		return;
	if (AT_SKB_L4LEN(skb) < (lp->proto == AT_NEXTHDR_UDP ? 8 : 20))
		return;
	const u8 *ports = c->l4;
	u16 sport = ((u16)ports[0] << 8) | ports[1];
	u16 dport = ((u16)ports[2] << 8) | ports[3];
	/* a query leaves for port 53; an answer arrives from it */
	if ((dir == AT_DIR_EGRESS ? dport : sport) != AT_DNS_PORT)
		return;
	u64 cg = 0, agent = 0;
	if (!at_skb_scope_c(skb, &cg, &agent))
		return;
	u32 off;
	if (lp->proto == AT_NEXTHDR_UDP)
		off = lp->l4off + 8;
	else
		off = lp->l4off + (c->l4[12] >> 4) * 4;
	u32 plen = lp->l3end > off ? lp->l3end - off : 0;
	if (plen == 0)
		return;  /* TCP handshake and ACKs */

	u32 zero = 0;
	struct at_dns *e = dns_scratch.lookup(&zero);
	if (!e)
		return;
	at_skb_header(&e->h, AT_EV_DNS, sizeof(*e), cg, agent);
	e->cookie = c->cookie;
	e->family = lp->family;
	e->protocol = lp->proto;
	e->sport = sport;
	e->dport = dport;
	e->direction = dir;
	e->pad = 0;
	e->pad2 = 0;
	__builtin_memcpy(e->saddr, lp->saddr, 16);
	__builtin_memcpy(e->daddr, lp->daddr, 16);
	u32 n = plen > AT_DNS_MAX ? AT_DNS_MAX : plen;
	/* plen > 0 here, so this is n again, in a form the verifier can bound to [1, 512] */
	n = ((n - 1) & (AT_DNS_MAX - 1)) + 1;
	e->len = n;
	if (bpf_skb_load_bytes(skb, off, e->msg, n) < 0)
		e->len = 0;
	if (events.ringbuf_output(e, sizeof(*e), at_wake_flags()) < 0)
		at_count_drop(agent, AT_EV_DNS);
}

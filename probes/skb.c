/* One cgroup_skb program per direction for every packet concern: tls.c (server names), icmp.c
 * (echo requests), dns.c (messages) and flow.c (first bytes and protocol policy).
 *
 * Why one: each concern was a program of its own on the same hook, so every packet of an agent
 * socket went through up to four programs a way, each parsing the IP and transport headers,
 * taking the socket cookie and looking up the flow again (about 1.5 us of BPF time per
 * loopback connect, measured with bpfcost). Here the headers are parsed and the cookie taken
 * once (struct at_skb_ctx, common.h), and the cgroup walk is done once, for whichever concern
 * asks first.
 *
 * Verdicts combine as the kernel combined the separate programs' (every concern runs; any
 * drop drops), in the order they were attached before: tls first, so flow.c sees the flow it
 * blocked. flow.c runs last: its second half is a tail call, which ends this program, so the
 * verdict so far goes with it, in skb->cb[0] (where and why: at_skb_ctx in common.h). A feature off is compiled out (-DAT_WITH_*); the loader loads
 * at_skb_ingress only where dns or flow is on (tracer/kernel/loader.py SKB_PROGRAMS). */

#if defined(AT_WITH_FLOW) || defined(AT_WITH_DNS) || defined(AT_WITH_ICMP) || defined(AT_WITH_TLS)

/* The headers every concern reads: the fixed IP header, then as much of the transport header
 * as the concerns use (TCP 20 bytes, UDP 8, ICMP the type). Returns -1 when nothing here has
 * anything to do with the packet (no IPv4/IPv6 header): every concern let such packets pass.
 * AT_SKB_BARE_TCP: an IPv4 TCP segment without payload, which only flow.c has a use for (tls
 * and dns read payload, icmp other protocols): the others are not run for it. */
#define AT_SKB_BARE_TCP 1
static __always_inline int at_skb_ctx_init(struct __sk_buff *skb, struct at_skb_ctx *c, int ingress)
{
	u32 l4off;
	if (skb->protocol == bpf_htons(AT_ETH_P_IP)) {
		/* IPv4 without options and a full TCP header, nearly every packet: both headers in
		 * one load (one helper call fewer per packet, ~9 per loopback connection) */
		if (bpf_skb_load_bytes(skb, 0, c->ip, 40) == 0 && (c->ip[0] & 0xf) == 5) {
			/* An arriving TCP segment with no payload and no FIN or RST (the handshake,
			 * bare ACKs: 3 of the ~4 segments a loopback connection delivers) is nothing
			 * to dns (no message) or flow (it carries no bytes and ends no way): it
			 * passes here, before the socket cookie and the concerns' own parses. */
			int bare = c->ip[9] == 6 &&
				   (((u32)c->ip[2] << 8) | c->ip[3]) == 20 + (u32)(c->ip[32] >> 4) * 4;
			if (ingress && bare && !(c->ip[33] & 0x05))
				return -1;
			__builtin_memcpy(c->l4, &c->ip[20], 20);
			skb->cb[AT_SKB_CB_VERDICT] = 1;
			skb->cb[AT_SKB_CB_SCOPE] = 0;
			skb->cb[AT_SKB_CB_L4LEN] = 20;
			c->cookie = bpf_get_socket_cookie(skb);
			return bare ? AT_SKB_BARE_TCP : 0;
		}
		if (bpf_skb_load_bytes(skb, 0, c->ip, 20) < 0)
			return -1;
		l4off = (c->ip[0] & 0xf) * 4;
	} else if (skb->protocol == bpf_htons(AT_ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 0, c->ip, 40) < 0)
			return -1;
		l4off = 40;
	} else {
		return -1;
	}
	skb->cb[AT_SKB_CB_VERDICT] = 1;
	skb->cb[AT_SKB_CB_SCOPE] = 0;
	/* one load of 20 bytes on every path, so the buffer is in one state for the verifier
	 * whatever the protocol; the shorter headers only where it failed (an ICMP echo, a UDP
	 * datagram shorter than that) */
	u32 n = 0;
	if (bpf_skb_load_bytes(skb, l4off, c->l4, 20) == 0)
		n = 20;
	else if (bpf_skb_load_bytes(skb, l4off, c->l4, 8) == 0)
		n = 8;
	else if (bpf_skb_load_bytes(skb, l4off, c->l4, 1) == 0)
		n = 1;
	skb->cb[AT_SKB_CB_L4LEN] = n;
	c->cookie = bpf_get_socket_cookie(skb);
	return 0;
}

int at_skb_egress(struct __sk_buff *skb)
{
	struct at_skb_ctx c;
	int r = at_skb_ctx_init(skb, &c, 0);
	if (r < 0)
		return 1;
	if (r != AT_SKB_BARE_TCP) {
#ifdef AT_WITH_TLS
		if (!at_tls_egress(skb, &c))
			at_skb_drop(skb);
#endif
#ifdef AT_WITH_ICMP
		if (!at_icmp_egress(skb, &c))
			at_skb_drop(skb);
#endif
#ifdef AT_WITH_DNS
		at_dns(skb, AT_DIR_EGRESS, &c);
#endif
	}
#ifdef AT_WITH_FLOW
	if (!at_flow(skb, AT_DIR_EGRESS, &c))
		at_skb_drop(skb);
#endif
	return skb->cb[AT_SKB_CB_VERDICT] & 1;
}

#if defined(AT_WITH_FLOW) || defined(AT_WITH_DNS)
int at_skb_ingress(struct __sk_buff *skb)
{
	struct at_skb_ctx c;
	int r = at_skb_ctx_init(skb, &c, 1);
	if (r < 0)
		return 1;
#ifdef AT_WITH_DNS
	if (r != AT_SKB_BARE_TCP)
		at_dns(skb, AT_DIR_INGRESS, &c);
#endif
#ifdef AT_WITH_FLOW
	if (!at_flow(skb, AT_DIR_INGRESS, &c))
		at_skb_drop(skb);
#endif
	return skb->cb[AT_SKB_CB_VERDICT] & 1;
}
#endif

#endif

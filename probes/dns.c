/* DNS: every DNS message an agent socket sends or receives on port 53, UDP or TCP, whichever
 * resolver path produced it (glibc, a Python resolver, dig, a static binary): cgroup_skb sees
 * the packets of agent sockets, so no per-library hook is needed and nothing else pays.
 *
 * The message (up to AT_DNS_MAX bytes; for TCP including the 2-byte length prefix) goes to
 * userspace, which parses it with dnspython (agenttrace.dns). Answers feed the per-agent name
 * cache. These programs never drop: DNS policy is decided on names, in userspace.
 *
 * The skb helpers (at_skb_scope, at_skb_header, at_skb_l3) are in common.h, shared with flow.c. */

#define AT_NEXTHDR_TCP 6
#define AT_NEXTHDR_UDP 17
#define AT_DNS_PORT 53


BPF_PERCPU_ARRAY(dns_scratch, struct at_dns, 1);

static __always_inline int at_dns(struct __sk_buff *skb, u8 dir)
{
	u64 cg = 0, agent = 0;
	struct at_l3 l;
	/* ports first, the cgroup walk only for port-53 packets: most packets are not DNS */
	if (at_skb_l3(skb, &l) < 0 || (l.proto != AT_NEXTHDR_UDP && l.proto != AT_NEXTHDR_TCP))
		return 1;
	u8 ports[4];
	if (bpf_skb_load_bytes(skb, l.l4off, ports, 4) < 0)
		return 1;
	u16 sport = ((u16)ports[0] << 8) | ports[1];
	u16 dport = ((u16)ports[2] << 8) | ports[3];
	/* a query leaves for port 53; an answer arrives from it */
	if ((dir == AT_DIR_EGRESS ? dport : sport) != AT_DNS_PORT)
		return 1;
	if (!at_skb_scope(skb, &cg, &agent))
		return 1;
	u32 off;
	if (l.proto == AT_NEXTHDR_UDP) {
		off = l.l4off + 8;
	} else {
		u8 doff;
		if (bpf_skb_load_bytes(skb, l.l4off + 12, &doff, 1) < 0)
			return 1;
		off = l.l4off + (doff >> 4) * 4;
	}
	u32 plen = l.l3end > off ? l.l3end - off : 0;
	if (plen == 0)
		return 1;  /* TCP handshake and ACKs */

	u32 zero = 0;
	struct at_dns *e = dns_scratch.lookup(&zero);
	if (!e)
		return 1;
	at_skb_header(&e->h, AT_EV_DNS, sizeof(*e), cg, agent);
	e->cookie = bpf_get_socket_cookie(skb);
	e->family = l.family;
	e->protocol = l.proto;
	e->sport = sport;
	e->dport = dport;
	e->direction = dir;
	e->pad = 0;
	e->pad2 = 0;
	__builtin_memcpy(e->saddr, l.saddr, 16);
	__builtin_memcpy(e->daddr, l.daddr, 16);
	u32 n = plen > AT_DNS_MAX ? AT_DNS_MAX : plen;
	/* plen > 0 here, so this is n again, in a form the verifier can bound to [1, 512] */
	n = ((n - 1) & (AT_DNS_MAX - 1)) + 1;
	e->len = n;
	if (bpf_skb_load_bytes(skb, off, e->msg, n) < 0)
		e->len = 0;
	if (events.ringbuf_output(e, sizeof(*e), at_wake_flags()) < 0)
		at_count_drop(agent, AT_EV_DNS);
	return 1;
}

int at_dns_egress(struct __sk_buff *skb) { return at_dns(skb, AT_DIR_EGRESS); }
int at_dns_ingress(struct __sk_buff *skb) { return at_dns(skb, AT_DIR_INGRESS); }

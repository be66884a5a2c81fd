/* DNS: every DNS message an agent socket sends or receives on port 53, UDP or TCP, whichever
 * resolver path produced it (glibc, a Python resolver, dig, a static binary): cgroup_skb sees
 * the packets of agent sockets, so no per-library hook is needed and nothing else pays.
 *
 * The message (up to AT_DNS_MAX bytes; for TCP including the 2-byte length prefix) goes to
 * userspace, which parses it with dnspython (agenttrace.dns). Answers feed the per-agent name
 * cache. These programs never drop: DNS policy is decided on names, in userspace.
 *
 * The skb helpers below are shared with flow.c (identical guarded block): whichever of the two
 * files comes first in the compile unit defines them. */

#define AT_ETH_P_IP   0x0800
#define AT_ETH_P_IPV6 0x86DD
#define AT_NEXTHDR_TCP 6
#define AT_SKB_AF_INET 2
#define AT_SKB_AF_INET6 10
#define AT_NEXTHDR_UDP 17
#define AT_DNS_PORT 53

#ifndef AT_SKB_SCOPE_DEFINED
#define AT_SKB_SCOPE_DEFINED
/* The agent of a socket: walk the socket's cgroup ancestors (not the current task's — skb
 * hooks also run in softirq) for a watched one. Shared with dns.c, which has the same block. */
static __always_inline int at_skb_scope(struct __sk_buff *skb, u64 *cg, u64 *agent)
{
	#pragma unroll
	for (int lvl = 0; lvl < AT_MAX_DEPTH; lvl++) {
		u64 id = bpf_skb_ancestor_cgroup_id(skb, lvl);
		if (id == 0)
			return 0;
		if (watched.lookup(&id)) {
			u64 a = bpf_skb_ancestor_cgroup_id(skb, lvl + 1);
			*agent = a ? a : id;
			*cg = bpf_skb_cgroup_id(skb);
			return 1;
		}
	}
	return 0;
}

/* Header for an skb event: the current task's identity when it is the socket's own cgroup
 * (egress from a syscall), else only the socket's cgroup ids (pid 0, empty comm). */
static __always_inline int at_skb_header(struct at_header *h, u16 type, u16 size, u64 cg, u64 agent)
{
#ifndef AT_SKB_NO_CURRENT
	/* bpf_get_current_* in cgroup_skb programs needs kernel 6.10; before that the loader
	 * passes -DAT_SKB_NO_CURRENT and userspace attributes records by socket cookie alone. */
	if (bpf_get_current_cgroup_id() == cg) {
		at_fill_header(h, type, size, cg, agent);
		return 1;
	}
#endif
	__builtin_memset(h, 0, sizeof(*h));
	h->type = type;
	h->size = size;
	h->ktime = bpf_ktime_get_ns();
	h->cgroup_id = cg;
	h->agent_cgroup_id = agent;
	return 0;
}

/* Transport header position and addresses of an skb (data starts at the IP header in cgroup
 * skb programs). IPv6 extension headers are not walked: TCP/UDP right after the fixed header
 * is what sockets of these programs carry in practice. */
struct at_l3 {
	u16 family;
	u8 proto;
	u8 pad;
	u32 l4off;
	u32 l3end;          /* end of the IP packet (total length) */
	u8 saddr[16];
	u8 daddr[16];
};

static __always_inline int at_skb_l3(struct __sk_buff *skb, struct at_l3 *l)
{
	__builtin_memset(l, 0, sizeof(*l));
	if (skb->protocol == bpf_htons(AT_ETH_P_IP)) {
		u8 iph[20];
		if (bpf_skb_load_bytes(skb, 0, iph, 20) < 0)
			return -1;
		l->family = AT_SKB_AF_INET;
		l->proto = iph[9];
		l->l4off = (iph[0] & 0xf) * 4;
		l->l3end = ((u32)iph[2] << 8) | iph[3];
		l->saddr[10] = l->saddr[11] = 0xff;
		l->daddr[10] = l->daddr[11] = 0xff;
		__builtin_memcpy(&l->saddr[12], &iph[12], 4);
		__builtin_memcpy(&l->daddr[12], &iph[16], 4);
		return 0;
	}
	if (skb->protocol == bpf_htons(AT_ETH_P_IPV6)) {
		u8 ip6[40];
		if (bpf_skb_load_bytes(skb, 0, ip6, 40) < 0)
			return -1;
		l->family = AT_SKB_AF_INET6;
		l->proto = ip6[6];
		l->l4off = 40;
		l->l3end = 40 + (((u32)ip6[4] << 8) | ip6[5]);
		__builtin_memcpy(l->saddr, &ip6[8], 16);
		__builtin_memcpy(l->daddr, &ip6[24], 16);
		return 0;
	}
	return -1;
}
#endif /* AT_SKB_SCOPE_DEFINED */

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
	if (events.ringbuf_output(e, sizeof(*e), 0) < 0)
		at_count_drop(agent, AT_EV_DNS);
	return 1;
}

int at_dns_egress(struct __sk_buff *skb) { return at_dns(skb, AT_DIR_EGRESS); }
int at_dns_ingress(struct __sk_buff *skb) { return at_dns(skb, AT_DIR_INGRESS); }

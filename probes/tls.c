/* TLS server names: drop a ClientHello whose SNI names a forbidden host (mining pools, public
 * tunnel services) before the peer gets a byte of it.
 *
 * Why apart from flow.c's reassembly: a ClientHello is self-describing (a handshake record,
 * 0x16 0x03 0x0?, carrying handshake type 1), so the decision needs no reassembly and no flow
 * state. skb.c's egress program runs this before flow.c, so on the segment it drops it also
 * marks flow.c's per-flow state blocked: flow.c then drops every later segment of the flow
 * (retransmissions, the rest of a long hello) without sending a record of its own, and the
 * one record of the flow is this one, with the name.
 *
 * What is parsed: the first TCP segment payload of a flow way (and every egress segment until
 * flow.c has seen both ways: the steady state costs one lookup, as in flow.c), read with
 * bpf_skb_load_bytes at scalar offsets (the helper checks the bounds), through session id,
 * cipher suites, compression methods and at most AT_SNI_EXTS extensions to server_name; its
 * first host_name, lowercased, is hashed from the end (FNV-1a, as tracer/match/policy.name_hash
 * and egress.c do) and looked up at every label boundary (`*.suffix` entries) and whole
 * (exact entries) in `sni_deny`, for the agent's group and for every agent (group 0).
 *
 * What it cannot see: a name past the end of the segment (a ClientHello split before its SNI,
 * or one too long for one segment): the segment passes, flow.c reassembles the first bytes, and
 * userspace kills the process (the rule's fallback). In monitor mode nothing is dropped; a
 * record goes out only when the name lies past flow.c's capture (AT_FLOW_BYTES), which already
 * carries it otherwise.
 *
 * Reads only UAPI (`__sk_buff`) and packet bytes. */

#ifndef AT_WITH_FLOW
#error "the tls feature needs the flow feature (it marks flow.c's per-flow state)"
#endif

#define AT_SNI_EXTS 32            /* extensions walked before server_name */
#define AT_FNV_BASIS_SNI 0xcbf29ce484222325ULL
#define AT_FNV_PRIME_SNI 0x100000001b3ULL

struct at_sni_key {
	u32 gid;                 /* agent group; 0 = every agent */
	u32 pad;
	u64 hash;                /* backward FNV-1a of the lowercase name (no trailing dot) */
};
struct at_sni_val {
	u32 exact;               /* policy id of the rule listing the name itself, 0 = none */
	u32 sub;                 /* policy id of the rule listing `*.name`, 0 = none */
};
#ifndef AT_SNI_ENTRIES
#define AT_SNI_ENTRIES 4096
#endif
BPF_HASH(sni_deny, struct at_sni_key, struct at_sni_val, AT_SNI_ENTRIES);

struct at_sni_scratch {
	struct at_sni rec;
	u64 rhash;
	u32 gid;
	u32 policy;
	u32 match;
	u32 pad;
	struct at_sni_key key;    /* at_sni_hit's sni_deny key (why there: see it) */
};
BPF_PERCPU_ARRAY(sni_scratch, struct at_sni_scratch, 1);

/* [0] ClientHellos parsed to their name, [1] names denied (dropped or, in monitor mode,
 * matched), [2] hellos whose name was past the segment (left to flow.c and userspace) */
BPF_PERCPU_ARRAY(sni_stats, u64, 3);

static __always_inline void at_sni_stat(u32 i)
{
	u64 *c = sni_stats.lookup(&i);
	if (c)
		(*c)++;
}

/* The key is built in the scratch map, not on the stack: this runs inside at_sni_match's
 * 256-step loop, where a stack key made the steps that looked up (at a dot) and those that did
 * not reach the loop head with different stack slots, which the verifier cannot prune one
 * against the other (egress.c's at_dn_hit, same fix). at_skb_egress verified 231,414
 * instructions before, 183,414 with this, 158,990 with the unconditional group-0 look-up below. */
static __always_inline void at_sni_hit(struct at_sni_scratch *s, u32 gid, int exact)
{
	s->key.gid = gid;
	s->key.pad = 0;
	s->key.hash = s->rhash;
	struct at_sni_val *v = sni_deny.lookup(&s->key);
	if (!v)
		return;
	u32 pid = exact ? v->exact : v->sub;
	/* the first hit from the end is the shortest suffix; a longer one (or the exact name)
	 * found later is the more specific rule and names the alert */
	if (pid) {
		s->policy = pid;
		s->match = exact ? AT_SNI_MATCH_EXACT : AT_SNI_MATCH_SUBDOMAINS;
	}
}

/* Backward hash over the name; at a dot the hash so far is that of the suffix after it. */
static __always_inline void at_sni_match(struct at_sni_scratch *s, u32 len)
{
	s->policy = 0;
	s->match = 0;
	s->rhash = AT_FNV_BASIS_SNI;
	for (u32 i = 0; i < AT_SNI_MAX; i++) {
		if (i >= len) {
			at_sni_hit(s, s->gid, 1);
			if (s->gid)
				at_sni_hit(s, 0, 1);
			return;
		}
		u8 c = s->rec.name[(len - 1 - i) & (AT_SNI_MAX - 1)];
		if (c >= 'A' && c <= 'Z')
			c += 'a' - 'A';
		if (c == '.') {
			/* group 0 (every agent) too, even where the agent's group is 0: the same
			 * look-up twice then, once per dot of a ClientHello's name, instead of a branch
			 * the verifier walks at each of the loop's 256 steps */
			at_sni_hit(s, s->gid, 0);
			at_sni_hit(s, 0, 0);
		}
		s->rhash = (s->rhash ^ c) * AT_FNV_PRIME_SNI;
		asm volatile("" ::: "memory");
	}
}

static __always_inline u32 at_be16p(const u8 *b)
{
	return ((u32)b[0] << 8) | b[1];
}

/* Run first by skb.c's egress program (before flow.c, which then sees the flow it blocked),
 * with the headers it parsed; returns this concern's verdict. */
static __always_inline int at_tls_egress(struct __sk_buff *skb, struct at_skb_ctx *c)
{
	/* Most egress packets are SYNs and bare ACKs, far shorter than the smallest IP + TCP +
	 * hello with a name (the 48-byte bound below): one compare instead of a hash lookup for
	 * each of them. */
	if (skb->len < 20 + 20 + 48)
		return 1;
	u64 cookie = c->cookie;
	struct at_flow_state *st = flow_state.lookup(&cookie);
	if (st && ((st->seen[0] && st->seen[1]) || st->blocked))
		return 1;    /* steady state, or flow.c drops the rest of a blocked flow */
	struct at_l3 l3;
	const struct at_l3 *lp = &l3;
	if (AT_SKB_L3(skb, c, &l3) < 0)
		return 1;
	if (lp->proto != AT_NEXTHDR_TCP || AT_SKB_L4LEN(skb) < 20)
		return 1;
	const u8 *tcph = c->l4;
	u32 off = lp->l4off + (tcph[12] >> 4) * 4;
	if (lp->l3end < off + 48)
		return 1;    /* no payload, or too short for a hello with a name */
	u32 end = lp->l3end;
	/* record header (5) + handshake header (4) */
	u8 h[9];
	if (bpf_skb_load_bytes(skb, off, h, 9) < 0)
		return 1;
	if (h[0] != 0x16 || h[1] != 0x03 || h[2] > 0x04 || h[5] != 0x01)
		return 1;
	u64 cg = 0, agent = 0;
	if (!at_skb_scope_c(skb, &cg, &agent))
		return 1;
	/* version (2) + random (32): the session id length follows */
	u32 p = off + 9 + 34;
	u8 b[4];
	if (bpf_skb_load_bytes(skb, p, b, 1) < 0)
		goto short_;
	p += 1 + b[0];
	if (bpf_skb_load_bytes(skb, p, b, 2) < 0)
		goto short_;
	p += 2 + at_be16p(b);                 /* cipher suites */
	if (bpf_skb_load_bytes(skb, p, b, 1) < 0)
		goto short_;
	p += 1 + b[0];                        /* compression methods */
	if (bpf_skb_load_bytes(skb, p, b, 2) < 0)
		goto short_;
	u32 xend = p + 2 + at_be16p(b);
	p += 2;
	u32 name_at = 0, nlen = 0;
	for (int i = 0; i < AT_SNI_EXTS; i++) {
		if (p + 4 > xend)
			return 1;                 /* no server_name: nothing to check */
		if (bpf_skb_load_bytes(skb, p, b, 4) < 0)
			goto short_;
		u32 elen = at_be16p(&b[2]);
		if (b[0] == 0 && b[1] == 0) {
			/* server_name_list length (2), name type (1), name length (2) */
			u8 sn[5];
			if (bpf_skb_load_bytes(skb, p + 4, sn, 5) < 0)
				goto short_;
			if (sn[2] != 0)
				return 1;         /* not host_name */
			name_at = p + 9;
			nlen = at_be16p(&sn[3]);
			break;
		}
		p += 4 + elen;
	}
	if (!name_at)
		return 1;
	if (name_at + nlen > end)
		goto short_;
	if (nlen == 0 || nlen > AT_SNI_NAME_MAX)
		return 1;    /* not a host name; userspace reports what it sees */
	u32 zero = 0;
	struct at_sni_scratch *s = sni_scratch.lookup(&zero);
	if (!s)
		return 1;
	u32 n = ((nlen - 1) & (AT_SNI_MAX - 1)) + 1;
	if (bpf_skb_load_bytes(skb, name_at, s->rec.name, n) < 0)
		goto short_;
	at_sni_stat(0);
	/* one trailing dot names the same host */
	if (n > 1 && s->rec.name[(n - 1) & (AT_SNI_MAX - 1)] == '.')
		n--;
	u32 *g = agent_group.lookup(&agent);
	s->gid = g ? *g : at_cfg(AT_CFG_DEFAULT_GROUP);
	at_sni_match(s, n);
	if (!s->policy)
		return 1;
	at_sni_stat(1);
	u32 enforce = at_cfg(AT_CFG_ENFORCE);
	if (!enforce && name_at + nlen - off <= AT_FLOW_BYTES)
		return 1;    /* flow.c's record carries the name: userspace reports from it */

	struct at_sni *e = &s->rec;
	at_flow_owner_header(&e->h, at_flow_owner(skb, cookie, st), AT_EV_SNI, sizeof(*e), cg, agent);
	e->cookie = cookie;
	e->family = lp->family;
	e->sport = ((u16)tcph[0] << 8) | tcph[1];
	e->dport = ((u16)tcph[2] << 8) | tcph[3];
	e->verdict = enforce ? AT_VERDICT_BLOCKED : AT_VERDICT_ALLOWED;
	e->match = s->match;
	e->policy_id = s->policy;
	e->name_len = n;
	e->name_off = name_at - off;
	__builtin_memcpy(e->saddr, lp->saddr, 16);
	__builtin_memcpy(e->daddr, lp->daddr, 16);
	if (enforce) {
		if (!st)
			st = at_flow_new_state(skb, cookie, 1);
		if (st) {
			st->blocked = 1;
			st->policy_id = s->policy;
		}
	}
	if (events.ringbuf_output(e, sizeof(*e), at_wake_flags()) < 0)
		at_count_drop(agent, AT_EV_SNI);
	return enforce ? 0 : 1;

short_:
	at_sni_stat(2);
	return 1;
}

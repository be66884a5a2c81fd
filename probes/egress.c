/* Egress allow-lists by DNS name: learn, in the kernel, the addresses that DNS answers for
 * allowed names bring to an agent's sockets, so the connect hooks (net.c) can let exactly
 * those through.
 *
 * Why here and not in userspace: a program that resolves a name and connects at once must
 * never lose the race against the tracer's reader. cgroup_skb ingress runs before the answer
 * is queued on the socket, so the address is in `learned` before the resolver library can
 * read it.
 *
 * What is parsed: UDP datagrams and TCP segments from port 53 (a TCP segment must begin with
 * the message's length prefix), up to AT_LB_SIZE bytes of the message; the question name
 * (one question, compression pointers followed backwards only, bounded hops and bytes); then
 * the answer section: A and AAAA records whose owner is the question name or a name a CNAME
 * of the chain pointed to. Anything malformed is counted and ignored: an address not learned
 * is denied, never allowed by accident.
 *
 * The skb helpers (at_skb_scope, at_skb_l3) are in common.h; the maps in net.c. */

#ifndef AT_WITH_NET
#error "the egress feature needs the net feature (its maps live in net.c)"
#endif

#define AT_LB_SIZE 1024          /* bytes of a DNS message parsed; power of two */
#define AT_LB_MASK (AT_LB_SIZE - 1)
#define AT_DN_MAXLEN 253         /* longest dotted name */
#define AT_DN_STEPS 300          /* bytes + pointer hops of one name */
#define AT_DN_HOPS 16
#define AT_RR_MAX 32             /* answer records examined */
#define AT_CHAIN_MAX 8           /* names of a CNAME chain followed */
#define AT_FNV_BASIS 0xcbf29ce484222325ULL
#define AT_FNV_PRIME 0x100000001b3ULL

struct at_dnp {
	u8 msg[AT_LB_SIZE];
	u8 name[256];            /* the question name: dotted, lowercase */
	u64 chain[AT_CHAIN_MAX]; /* forward hashes of the names whose records count */
	u32 len;
	u32 nchain;
	u32 ancount;
	u32 rpos;
	u32 gid;
	u32 ttl_min;
	u32 ttl_max;
	u32 allowed;
	u64 allow_key;           /* name_allow key of the pattern that allowed the question name */
	/* name decoder state */
	u32 pos, rem, hops, next, outlen, err, done, lastptr;
	u64 hash;
	/* backward hash over `name` */
	u64 rhash;
	struct at_dn_key key;    /* at_dn_hit's name_allow key (why there: see it) */
};
BPF_PERCPU_ARRAY(dnp_scratch, struct at_dnp, 1);

/* [0] answers for allowed names parsed, [1] addresses learned, [2] messages not parsed
 * (malformed, truncated, unsupported), [3] answers for names no pattern allows, [4] answers
 * from a server the agent may not reach (forged: an accomplice sending "answers" from port 53
 * to an agent's socket) */
BPF_PERCPU_ARRAY(egress_stats, u64, 5);

static __always_inline void at_estat(u32 i)
{
	u64 *c = egress_stats.lookup(&i);
	if (c)
		(*c)++;
}

/* One step of decoding a name: a label length, a compression pointer or one label byte.
 * 1 = finished (s->done or s->err set), 0 = go on. State lives in the scratch map, so the
 * verifier sees the same registers at every loop head and prunes. `want` (write the dotted
 * name too) is the caller's constant, not a field: each decode then verifies only its own
 * side of that test (at_egress_rr 141,351 -> 123,640 instructions). */
static __always_inline int at_dn_step(struct at_dnp *s, const u32 want)
{
	if (s->pos >= s->len) {
		s->err = 1;
		return 1;
	}
	u8 c = s->msg[s->pos & AT_LB_MASK];
	if (s->rem == 0) {
		if (c == 0) {
			if (!s->hops)
				s->next = s->pos + 1;
			s->done = 1;
			return 1;
		}
		if ((c & 0xc0) == 0xc0) {
			if (s->pos + 1 >= s->len || ++s->hops > AT_DN_HOPS) {
				s->err = 1;
				return 1;
			}
			u32 ptr = ((u32)(c & 0x3f) << 8) | s->msg[(s->pos + 1) & AT_LB_MASK];
			if (s->hops == 1)
				s->next = s->pos + 2;
			/* every jump goes further back than the last: no pointer loop can form */
			if (ptr >= s->lastptr) {
				s->err = 1;
				return 1;
			}
			s->lastptr = ptr;
			s->pos = ptr;
			return 0;
		}
		if (c & 0xc0) {          /* 0x40/0x80 label types: obsolete, refused */
			s->err = 1;
			return 1;
		}
		s->rem = c;
		s->pos++;
		if (s->outlen) {
			if (want)
				s->name[s->outlen & 255] = '.';
			s->outlen++;
			s->hash = (s->hash ^ '.') * AT_FNV_PRIME;
		}
		return 0;
	}
	/* a dot inside a label would let "a.pypi" + "org" pass for a.pypi.org */
	if (c == '.' || s->outlen >= AT_DN_MAXLEN) {
		s->err = 1;
		return 1;
	}
	if (c >= 'A' && c <= 'Z')
		c += 'a' - 'A';
	if (want)
		s->name[s->outlen & 255] = c;
	s->outlen++;
	s->hash = (s->hash ^ c) * AT_FNV_PRIME;
	s->rem--;
	s->pos++;
	return 0;
}

/* Decode the name at off into s->hash (forward FNV of the dotted lowercase name) and
 * s->next (where the record continues). */
static __always_inline int at_dn_decode(struct at_dnp *s, u32 off, u32 want)
{
	s->pos = off;
	s->lastptr = off;
	s->rem = 0;
	s->hops = 0;
	s->next = 0;
	s->outlen = 0;
	s->err = 0;
	s->done = 0;
	s->hash = AT_FNV_BASIS;
	for (int i = 0; i < AT_DN_STEPS; i++) {
		if (at_dn_step(s, want))
			break;
		/* reload the state from memory each step: values the compiler kept in registers
		 * would differ between paths and stop the verifier from pruning */
		asm volatile("" ::: "memory");
	}
	return s->done && !s->err ? 0 : -1;
}

/* The key is built in the scratch map, not on the stack: at_rev_match calls this inside its
 * 256-step loop, and a key on the stack left the loop head with stack slots that differ between
 * the steps that looked up (at a dot) and those that did not, so the verifier could not prune
 * one against the other. In map memory (whose contents it does not track) every step reaches
 * the loop head alike: at_egress_learn verified 440,601 instructions with the stack key and
 * 123,245 with this one (the allow-list's ~0.3 s of every start). */
static __always_inline void at_dn_hit(struct at_dnp *s, u8 need)
{
	s->key.gid = s->gid;
	s->key.pad = 0;
	s->key.hash = s->rhash;
	struct at_dn_val *v = name_allow.lookup(&s->key);
	if (v && (v->flags & need)) {
		s->allowed = 1;
		s->allow_key = s->rhash;   /* the longest matching suffix wins: it is checked last */
	}
}

/* Backward FNV over the question name; at every label boundary the hash so far is that of a
 * suffix, checked against `*.suffix` patterns; at the start, the whole name against exact ones. */
static __always_inline void at_rev_match(struct at_dnp *s)
{
	s->allowed = 0;
	s->rhash = AT_FNV_BASIS;
	for (u32 i = 0; i < 256; i++) {
		if (i >= s->outlen) {
			at_dn_hit(s, AT_DN_EXACT);
			return;
		}
		u8 c = s->name[(s->outlen - 1 - i) & 255];
		if (c == '.')
			at_dn_hit(s, AT_DN_SUBDOMAINS);
		s->rhash = (s->rhash ^ c) * AT_FNV_PRIME;
		asm volatile("" ::: "memory");
	}
}

static __always_inline void at_learn(struct at_dnp *s, u32 rd, u32 alen, u32 ttl)
{
	struct at_learn_key k = {};
	k.gid = s->gid;
	if (alen == 4) {
		k.addr[10] = 0xff;
		k.addr[11] = 0xff;
		#pragma unroll
		for (int j = 0; j < 4; j++)
			k.addr[12 + j] = s->msg[(rd + j) & AT_LB_MASK];
	} else {
		#pragma unroll
		for (int j = 0; j < 16; j++)
			k.addr[j] = s->msg[(rd + j) & AT_LB_MASK];
	}
	if (ttl < s->ttl_min)
		ttl = s->ttl_min;
	if (ttl > s->ttl_max)
		ttl = s->ttl_max;
	u64 now = bpf_ktime_get_ns();
	struct at_learn_val v = {};
	u64 exp = now + (u64)ttl * 1000000000ULL, key = s->allow_key;
	struct at_learn_val *old = learned.lookup(&k);
	v.name[0] = key;
	v.expires_ns[0] = exp;
	if (old) {
		/* the address may have come from another allowed name too: keep the newest two */
		if (old->name[0] == key) {
			if (old->expires_ns[0] > exp)
				v.expires_ns[0] = old->expires_ns[0];
			v.name[1] = old->name[1];
			v.expires_ns[1] = old->expires_ns[1];
		} else if (old->name[1] == key) {
			if (old->expires_ns[1] > exp)
				v.expires_ns[0] = old->expires_ns[1];
			v.name[1] = old->name[0];
			v.expires_ns[1] = old->expires_ns[0];
		} else {
			v.name[1] = old->name[0];
			v.expires_ns[1] = old->expires_ns[0];
		}
	}
	learned.update(&k, &v);
	at_estat(1);
}

static __always_inline u32 at_be16(struct at_dnp *s, u32 o)
{
	return ((u32)s->msg[o & AT_LB_MASK] << 8) | s->msg[(o + 1) & AT_LB_MASK];
}

/* Answer records are walked one per program run, each run tail-calling the next: one
 * record's two name decodes fit the verifier's budget, 32 records in one program would not
 * (and BCC cannot relocate bpf_loop callbacks). */
BPF_PROG_ARRAY(egress_progs, 1);

int at_egress_rr(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct at_dnp *s = dnp_scratch.lookup(&zero);
	if (!s)
		return 1;
	if (s->ancount == 0 || s->rpos >= s->len)
		return 1;
	s->ancount--;
	if (at_dn_decode(s, s->rpos, 0) < 0 || s->next + 10 > s->len) {
		at_estat(2);
		return 1;
	}
	u64 h = s->hash;
	u32 next = s->next;
	u32 type = at_be16(s, next), cls = at_be16(s, next + 2);
	u32 ttl = (at_be16(s, next + 4) << 16) | at_be16(s, next + 6);
	u32 rdlen = at_be16(s, next + 8);
	u32 rd = next + 10;
	u32 end = rd + rdlen;
	if (end > s->len) {
		at_estat(2);
		return 1;
	}
	int in_chain = 0;
	#pragma unroll
	for (int k = 0; k < AT_CHAIN_MAX; k++)
		if (k < s->nchain && s->chain[k] == h)
			in_chain = 1;
	if (in_chain && cls == 1) {
		if (type == 5) {                     /* CNAME: its target's records count too */
			if (s->nchain < AT_CHAIN_MAX && at_dn_decode(s, rd, 0) == 0) {
				s->chain[s->nchain & (AT_CHAIN_MAX - 1)] = s->hash;
				s->nchain++;
			}
		} else if (type == 1 && rdlen == 4) {
			at_learn(s, rd, 4, ttl);
		} else if (type == 28 && rdlen == 16) {
			at_learn(s, rd, 16, ttl);
		}
	}
	s->rpos = end;
	if (s->ancount && s->rpos < s->len)
		egress_progs.call(skb, 0);
	return 1;
}

int at_egress_learn(struct __sk_buff *skb)
{
	struct at_l3 l;
	if (at_skb_l3(skb, &l) < 0 || (l.proto != 17 && l.proto != 6))
		return 1;
	u8 ports[2];
	if (bpf_skb_load_bytes(skb, l.l4off, ports, 2) < 0)
		return 1;
	if ((((u16)ports[0] << 8) | ports[1]) != 53)
		return 1;
	u64 cg = 0, agent = 0;
	if (!at_skb_scope(skb, &cg, &agent))
		return 1;
	u32 gid = 0;
	u32 *g = agent_group.lookup(&agent);
	if (g)
		gid = *g;
	else
		gid = at_cfg(AT_CFG_DEFAULT_GROUP);
	struct at_group_allow *ga = group_allow.lookup(&gid);
	if (!ga)
		return 1;                /* no allow-list for this agent: nothing to learn */
	/* only a server the agent may itself send DNS to can teach it addresses */
	u32 pol = 0;
	if (at_dst_verdict(agent, l.saddr, 53, l.proto, &pol) == AT_VERDICT_BLOCKED || pol) {
		at_estat(4);
		return 1;
	}
	u32 off, tcp = l.proto == 6;
	if (!tcp) {
		off = l.l4off + 8;
	} else {
		u8 doff;
		if (bpf_skb_load_bytes(skb, l.l4off + 12, &doff, 1) < 0)
			return 1;
		off = l.l4off + (doff >> 4) * 4;
	}
	u32 plen = l.l3end > off ? l.l3end - off : 0;
	if (plen <= (tcp ? 2 : 0))
		return 1;                /* handshake, ACKs */
	u32 zero = 0;
	struct at_dnp *s = dnp_scratch.lookup(&zero);
	if (!s)
		return 1;
	u32 mlen = plen;
	if (tcp) {
		u8 pfx[2];
		if (bpf_skb_load_bytes(skb, off, pfx, 2) < 0)
			return 1;
		u32 want = ((u32)pfx[0] << 8) | pfx[1];
		off += 2;
		mlen = plen - 2;
		if (want < mlen)
			mlen = want;
	}
	if (mlen < 12)
		return 1;
	u32 n = mlen > AT_LB_SIZE ? AT_LB_SIZE : mlen;
	n = ((n - 1) & AT_LB_MASK) + 1;  /* n again, in a form the verifier can bound */
	if (bpf_skb_load_bytes(skb, off, s->msg, n) < 0) {
		at_estat(2);
		return 1;
	}
	s->len = n;
	/* a response (QR), NOERROR, one question */
	if (!(s->msg[2] & 0x80) || (s->msg[3] & 0xf) != 0 || at_be16(s, 4) != 1)
		return 1;
	s->gid = gid;
	s->ttl_min = ga->ttl_min;
	s->ttl_max = ga->ttl_max;
	s->ancount = at_be16(s, 6);
	if (at_dn_decode(s, 12, 1) < 0) {
		at_estat(2);
		return 1;
	}
	u64 qh = s->hash;
	u32 qnext = s->next;
	at_rev_match(s);
	if (!s->allowed) {
		at_estat(3);
		return 1;
	}
	at_estat(0);
	s->chain[0] = qh;
	s->nchain = 1;
	s->rpos = qnext + 4;             /* past QTYPE and QCLASS */
	if (s->ancount > AT_RR_MAX)
		s->ancount = AT_RR_MAX;
	egress_progs.call(skb, 0);
	return 1;
}

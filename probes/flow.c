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


/* Protocol policy: tracer/match/policy.py compiles rules with `on: flow` + `action: block` into
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
	u8 seen[2];              /* per AT_DIR_*: first payload captured and sent */
	u8 blocked;
	u8 owner_known;
	u32 policy_id;
	u8 pending[2];           /* per AT_DIR_*: a capture is being reassembled in flow_asm */
	u8 interim[2];           /* per AT_DIR_*: an undecided capture was already sent once */
	u8 pad[4];
};
BPF_TABLE("lru_hash", u64, struct at_flow_state, flow_state, 65536);

#if defined(AT_WITH_NET) && !defined(AT_SKB_NO_CURRENT)
#define AT_FLOW_CONNECT_OWNER 1
/* The owner of a flow the connect hook saw: net.c's entry for the socket (pending_conn), made
 * in the connect() whose SYN is the flow's first segment. So that segment and every bare one
 * after it make no entry here (the cost of a refused connect was mostly that entry and the
 * cgroup walk before it); the first payload either way makes it, with this owner. Only when
 * the socket is in its caller's cgroup: what at_skb_header asks of the task sending the SYN,
 * which is that caller. The socket's address and then its cookie name it: a stale entry of a
 * freed socket whose address was reused fails the cookie. */
static __always_inline struct at_pending *at_flow_connect_owner(struct __sk_buff *skb, u64 cookie)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 0;
	u64 key = (u64)sk;
	struct at_pending *p = pending_conn.lookup(&key);
	if (!p || p->cookie != cookie || p->h.cgroup_id != bpf_skb_cgroup_id(skb))
		return 0;
	return p;
}

static __always_inline void at_flow_connect_forget(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return;
	u64 key = (u64)sk;
	pending_conn.delete(&key);
}
#endif

/* A flow's entry, made by its first payload (or tls.c's block): with the owner the connect hook
 * saw, which the entry holds from then on. `look` 0: the caller found no such owner already. */
static __always_inline struct at_flow_state *at_flow_new_state(struct __sk_buff *skb, u64 cookie, int look)
{
	struct at_flow_state fresh = {};
#ifdef AT_FLOW_CONNECT_OWNER
	struct at_pending *cp = look ? at_flow_connect_owner(skb, cookie) : 0;
	if (cp) {
		__builtin_memcpy(&fresh.owner, &cp->h, sizeof(fresh.owner));
		fresh.owner.type = AT_EV_FLOW;
		fresh.owner.size = sizeof(struct at_flow);
		fresh.owner_known = 1;
		/* the result is out: nothing else needs the connect's entry */
		if (cp->done)
			at_flow_connect_forget(skb);
		else
			cp->flow = 1;
	}
#endif
	flow_state.update(&cookie, &fresh);
	return flow_state.lookup(&cookie);
}

/* The owner of a flow as far as known: its entry's, else the connect hook's for a flow that has
 * no entry yet (tls.c looks before flow.c makes it), else none. */
static __always_inline const struct at_header *at_flow_owner(struct __sk_buff *skb, u64 cookie,
							     struct at_flow_state *st)
{
	if (st)
		return st->owner_known ? &st->owner : 0;
#ifdef AT_FLOW_CONNECT_OWNER
	struct at_pending *cp = at_flow_connect_owner(skb, cookie);
	if (cp)
		return &cp->h;
#endif
	return 0;
}

/* Reassembly. A protocol is not what the first segment says but what the first bytes of the
 * stream say: a banner sent one byte at a time, a stratum login after a page of blanks, or an
 * SSH banner after the pre-banner lines RFC 4253 allows all put the telling bytes past the first
 * segment. So each direction's first AT_FLOW_BYTES bytes after leading whitespace are collected
 * here, placed by TCP sequence number (a retransmission is not taken twice), and classified after
 * every segment; the record goes out, and the verdict applies to the segment in hand, as soon
 * as the bytes decide the protocol, the capture is full, this way of the flow ends (FIN/RST),
 * or a segment arrives ahead of a missing one (the receiver queues it, so it never comes
 * again: the capture ends at the hole). Until then segments pass: nothing is held back from
 * the peer. When the peer sends data first, an interim copy goes out (see below).
 *
 * Limits: more than AT_FLOW_BYTES bytes of other lines before a banner, or more than
 * AT_FLOW_SKIP_MAX bytes of leading whitespace, still pass undecided; the record says so
 * (capture full / AT_FLOWF_PAD_LIMIT) and userspace reports what it can.
 *
 * The entry holds the record being built plus AT_FLOW_BYTES of slack, so a copy of up to
 * AT_FLOW_BYTES bytes at any offset below AT_FLOW_BYTES is provably inside the value. */
#ifndef AT_FLOW_SKIP_MAX
#define AT_FLOW_SKIP_MAX 4096     /* leading whitespace skipped per direction */
#endif
#define AT_FLOW_CHUNK 64          /* whitespace is scanned this many bytes at a time */
#define AT_FLOW_SKIP_CHUNKS 24    /* chunks scanned per segment (1536 bytes, about one MSS) */
struct at_flow_asm_key {
	u64 cookie;
	u32 dir;
	u32 pad;
};
struct at_flow_asm {
	struct at_flow rec;
	u8 slack[AT_FLOW_BYTES];
	u32 next_seq;            /* sequence number of the next byte wanted */
	u32 tmp;                 /* loop results pass through memory: the verifier then checks
				  * what follows the loop once, not once per exit */
};
BPF_TABLE("lru_hash", struct at_flow_asm_key, struct at_flow_asm, flow_asm, 8192);
_Static_assert(__builtin_offsetof(struct at_flow_asm, slack) % 8 == 0, "at_ws_prefix reads slack by words");

/* Scratch record: classified before it is copied to the ring buffer, so a failed reserve
 * never changes a verdict. */
BPF_PERCPU_ARRAY(flow_scratch, struct at_flow_asm, 1);
/* at_flow_decide per way: one array each, as a tail call's target must match its caller's
 * attach type */
BPF_PROG_ARRAY(flow_egress_next, 2);
BPF_PROG_ARRAY(flow_ingress_next, 2);

/* Leading whitespace eight bytes at a time (SWAR). The byte loop this replaces branched six
 * ways on each of up to 24 x 64 bytes, and the verifier walked all of it at every start: the
 * word-wise skip took the default probes from 718k verified instructions to 592k
 * (docs/STARTUP.md). Word arithmetic without branches finds the same byte. */
#define AT_B8(x) (0x0101010101010101ULL * (u8)(x))

/* 0x80 in each byte of x that is zero, nothing else: exact, no borrow crosses a byte */
static __always_inline u64 at_zero_bytes(u64 x)
{
	u64 lo7 = AT_B8(0x7f);
	return ~(((x & lo7) + lo7) | x | lo7);
}

/* How many of the eight bytes at p are whitespace (space, \t, \n, \v, \f, \r: C's isspace)
 * before the first that is not; 8 when all are. p is 8-byte aligned (the assertion below). */
static __always_inline u32 at_ws_prefix(const u8 *p)
{
	u64 w = *(const u64 *)p;
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	w = __builtin_bswap64(w);      /* the first byte in memory lowest, as below assumes */
#endif
	u64 m = at_zero_bytes(w ^ AT_B8(' ')) | at_zero_bytes(w ^ AT_B8('\t')) |
		at_zero_bytes(w ^ AT_B8('\n')) | at_zero_bytes(w ^ AT_B8('\v')) |
		at_zero_bytes(w ^ AT_B8('\f')) | at_zero_bytes(w ^ AT_B8('\r'));
	/* keep a byte's bit only if every byte before it is whitespace too (a prefix AND) */
	m &= (m << 8) | 0x80;
	m &= (m << 16) | 0x8080;
	m &= (m << 32) | 0x80808080;
	return (u32)(((m >> 7) * AT_B8(1)) >> 56);   /* the bits left, summed in the top byte */
}

/* How many of the first n (1..AT_FLOW_CHUNK) bytes of buf are whitespace before the first that
 * is not. The bytes past n are whatever an earlier load left, so the count over the whole chunk
 * is cut to n (a count that reaches n means all n were blanks). Past the first word (a stream
 * that starts with a telling byte, nearly every one, ends there) without a branch. */
static __always_inline u32 at_ws_run(const u8 *buf, u32 n)
{
	u32 j = at_ws_prefix(buf);
	if (j == 8) {
		u32 run = 1;     /* every word so far was all whitespace */
#pragma unroll
		for (int w = 1; w < AT_FLOW_CHUNK / 8; w++) {
			u32 k = at_ws_prefix(&buf[w * 8]);
			j += k & (0u - run);
			run &= k >> 3;
		}
	}
	return j < n ? j : n;
}

/* The loops over the capture read its length from the record at each test, not from a
 * register: a register would leave each exit of the loop with its own known range of the
 * length, and the verifier would check what follows once per exit (see docs/STARTUP.md). */
#define AT_CAP_LEN(r) (*(const volatile u32 *)&(r)->len)

/* bytes of `needle` found in the first len bytes of the capture (bounded: once per flow and way) */
static __always_inline int at_has8(const struct at_flow *r, u64 needle, u64 mask)
{
	const u8 *d = r->data;
	for (u32 i = 0; i + 8 <= AT_FLOW_BYTES; i++) {
		if (i + 8 > AT_CAP_LEN(r))
			return 0;
		u64 w;
		__builtin_memcpy(&w, &d[i], 8);
		if ((w & mask) == needle)
			return 1;
	}
	return 0;
}

/* Where an SSH identification line starts: 0, or just after a newline (lines before the
 * banner); -1 when there is none in the first len bytes. */
static __always_inline int at_ssh_line(const struct at_flow *r)
{
	const u8 *d = r->data;
	u32 ssh = 0x2d485353;  /* "SSH-" */
	for (u32 i = 0; i + 5 <= AT_FLOW_BYTES; i++) {
		if (i + 5 > AT_CAP_LEN(r))
			return -1;
		if (d[i] != '\n')
			continue;
		u32 w;
		__builtin_memcpy(&w, &d[i + 1], 4);
		if (w == ssh)
			return i + 1;
	}
	return -1;
}

#define AT_CLASS_FINAL 0x100      /* at_classify: no later byte can change the answer */
#define AT_CLASS_PREBANNER 0x200  /* passed on to at_flow_finish: lines came before the banner */

/* Cheap kernel-side guess; userspace (agenttrace.protocols) does the real parse. Returns
 * AT_PROTO_* | AT_CLASS_FINAL when decided. */
static __always_inline u32 at_classify(const struct at_flow *r, u32 *prebanner)
{
	const u8 *d = r->data;
	u32 len = AT_CAP_LEN(r);
	u32 full = len >= AT_FLOW_BYTES ? AT_CLASS_FINAL : 0;
	if (len == 0)
		return AT_PROTO_UNKNOWN;
	if (len >= 4 && d[0] == 'S' && d[1] == 'S' && d[2] == 'H' && d[3] == '-')
		return AT_PROTO_SSH | AT_CLASS_FINAL;
	/* a prefix of "SSH-": the next bytes decide */
	if (d[0] == 'S' && (len < 2 || d[1] == 'S') && (len < 3 || d[2] == 'H') && len < 4)
		return AT_PROTO_UNKNOWN;
	if (d[0] == 0x16) {
		if (len < 6)
			return full;
		if (d[1] == 0x03 && (d[5] == 0x01 || d[5] == 0x02)) {
			u32 rec = 5 + (((u32)d[3] << 8) | d[4]);
			return AT_PROTO_TLS | (len >= rec ? AT_CLASS_FINAL : full);
		}
		return AT_PROTO_UNKNOWN | AT_CLASS_FINAL;
	}
	if (d[0] == '{' || d[0] == '[') {
		/* "mining. and "login" as little-endian u64 words (the last one masked to 7 bytes) */
		if (at_has8(r, 0x2e676e696e696d22ULL, ~0ULL) ||
		    at_has8(r, 0x226e69676f6c22ULL, 0x00ffffffffffffffULL))
			return AT_PROTO_STRATUM | AT_CLASS_FINAL;
		return AT_PROTO_UNKNOWN | full;
	}
	if (len >= 4) {
		u32 w;
		__builtin_memcpy(&w, d, 4);
		/* request methods by their first four bytes, little-endian */
		if (w == 0x20544547 /* "GET " */ || w == 0x54534f50 /* POST */ || w == 0x20545550 /* "PUT " */ ||
		    w == 0x44414548 /* HEAD */ || w == 0x4e4e4f43 /* CONN */ || w == 0x454c4544 /* DELE */ ||
		    w == 0x4954504f /* OPTI */ || w == 0x43544150 /* PATC */ || w == 0x50545448 /* HTTP */ ||
		    w == 0x20495250 /* "PRI " */) {
			/* CONNECT host:22 through a proxy opens an SSH session: the request line already
			 * says so, so it is ssh here and a forbidden one drops with its first bytes */
			if (w == 0x4e4e4f43 && len > 12 && d[4] == 'E' && d[5] == 'C' && d[6] == 'T' && d[7] == ' ') {
				for (u32 i = 9; i < AT_FLOW_BYTES; i++) {
					if (i >= AT_CAP_LEN(r))
						break;
					u8 c = d[i];
					if (c == ' ' || c == '\r' || c == '\n') {
						if (d[i - 3] == ':' && d[i - 2] == '2' && d[i - 1] == '2')
							return AT_PROTO_SSH | AT_CLASS_FINAL;
						break;
					}
				}
			}
			/* final once the header block ends in the capture */
			u32 t = 0;
			if (len >= 4 && len <= AT_FLOW_BYTES)
				__builtin_memcpy(&t, &d[(len - 4) & (AT_FLOW_BYTES - 1)], 4);
			return AT_PROTO_HTTP | (t == 0x0a0d0a0d ? AT_CLASS_FINAL : full);
		}
	}
	/* text that may be lines before an SSH banner (RFC 4253 4.2) */
	int at = at_ssh_line(r);
	if (at > 0) {
		*prebanner = 1;
		return AT_PROTO_SSH | AT_CLASS_FINAL;
	}
	return AT_PROTO_UNKNOWN | full;
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
	/* an agent userspace has not placed yet is in the config's default group, as at connect */
	u32 gid = g ? *g : at_cfg(AT_CFG_DEFAULT_GROUP);
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

/* Copy a finished capture to the ring buffer and forget its reassembly entry. */
static __always_inline void at_flow_send(struct at_flow_asm *a, struct at_flow_asm_key *k, u64 agent)
{
	if (events.ringbuf_output(&a->rec, sizeof(a->rec), at_wake_flags()) < 0)
		at_count_drop(agent, AT_EV_FLOW);
	flow_asm.delete(k);
}

/* The header of a record about a flow: its owner as the SYN's syscall context saw it (later
 * segments may leave in softirq, where current is nobody's), else what the skb says. tls.c's
 * records take it the same way. */
static __always_inline void at_flow_owner_header(struct at_header *h, const struct at_header *owner, u16 type,
						 u16 size, u64 cg, u64 agent)
{
	if (owner) {
		__builtin_memcpy(h, owner, sizeof(*h));
		h->ktime = bpf_ktime_get_ns();
		h->type = type;
		h->size = size;
	} else {
		at_skb_header(h, type, size, cg, agent);
	}
}

/* One way of a flow, run last by skb.c's program for that way with the headers it parsed. Its
 * tail-called second half ends that program, so it returns its verdict combined with the one
 * of the concerns that ran before (at_flow_prior). */
static __always_inline int at_flow(struct __sk_buff *skb, u8 dir, struct at_skb_ctx *c)
{
	u64 cookie = c->cookie;
	/* The headers are in hand (skb.c parsed them): reading them costs less than the lookup
	 * below, which a bare ingress segment never needs -- it changes nothing unless it ends a
	 * way (the handshake's and the ACKs of every flow leave here). */
	struct at_l3 l;
	if (AT_SKB_L3(skb, c, &l) < 0 || l.proto != AT_NEXTHDR_TCP || AT_SKB_L4LEN(skb) < 20)
		return 1;
	const u8 *tcph = c->l4;
	u32 doff = (tcph[12] >> 4) * 4;
	u32 off = l.l4off + doff;
	u32 plen = l.l3end > off ? l.l3end - off : 0;
	u8 fin = tcph[13] & 0x05;  /* FIN or RST: the stream ends here */
	if (!plen && !fin && dir != AT_DIR_EGRESS)
		return 1;
#ifdef AT_FLOW_CONNECT_OWNER
	/* A connect's SYN, FIN or RST without payload, once or twice per connection: while the
	 * connect's entry says the flow has none of its own, there is nothing here to do (no owner
	 * to learn, no capture to flush), so that warm entry is asked and the flow table not at all.
	 * Bare ACKs go the other way round: most are of flows that have their entry. */
	if (!plen && (fin || (dir == AT_DIR_EGRESS && (tcph[13] & 0x12) == 0x02))) {
		struct at_pending *cp = at_flow_connect_owner(skb, cookie);
		if (cp && !cp->flow) {
			/* a reset ends the socket: its owner is needed no more, unless its result
			 * is still to come (that deletes it then) */
			if ((tcph[13] & 0x04) && cp->done)
				at_flow_connect_forget(skb);
			return 1;
		}
	}
#endif

	struct at_flow_state *st = flow_state.lookup(&cookie);
	/* The steady state of a flow (both ways captured, not blocked) costs one hash lookup per
	 * packet: no cgroup walk. */
	if (st && st->seen[0] && st->seen[1] && !st->blocked)
		return 1;
	/* A segment without payload changes nothing below unless it ends a way with a capture
	 * pending (flushed) or is the first egress one of a socket whose owner is not known yet
	 * (learned): most packets of a short flow -- the handshake, bare ACKs, the RST of a flow
	 * that never sent a byte, whatever arrives for a socket never seen -- leave before the
	 * cgroup walk and without an entry being made. */
	if (!plen && dir != AT_DIR_EGRESS && !st)
		return 1;
	/* A bare FIN or RST leaving a socket that has no entry (an accepted socket closed before it
	 * sent a byte, ~4 in 5 connections of a connect storm): no capture is pending to flush and
	 * this way carries nothing more, so the owner it would teach has no record to go on. Making
	 * the entry here was the dearest path of the program (cgroup walk, header, table insert). */
	if (!plen && fin && !st)
		return 1;
#ifdef AT_FLOW_CONNECT_OWNER
	if (!st && !plen) {
		struct at_pending *cp = at_flow_connect_owner(skb, cookie);
		if (cp) {
			/* a reset ends the socket: its owner is needed no more, unless its result is
			 * still to come (the tracepoint deletes it then) */
			if ((tcph[13] & 0x04) && cp->done)
				at_flow_connect_forget(skb);
			return 1;
		}
	}
#endif
	if (st && !plen && (st->owner_known || dir != AT_DIR_EGRESS) &&
	    (!fin || (!st->pending[0] && !st->pending[1])))
		return 1;
	u64 cg = 0, agent = 0;
	if (!at_skb_scope_c(skb, &cg, &agent))
		return 1;
	u32 seq = ((u32)tcph[4] << 24) | ((u32)tcph[5] << 16) | ((u32)tcph[6] << 8) | tcph[7];
	u16 sport = ((u16)tcph[0] << 8) | tcph[1];
	u16 dport = ((u16)tcph[2] << 8) | tcph[3];

	if (!st) {
		st = at_flow_new_state(skb, cookie, plen != 0);  /* a bare one looked already */
		if (!st)
			return 1;
	}
	if (!st->owner_known && dir == AT_DIR_EGRESS &&
	    at_skb_header(&st->owner, AT_EV_FLOW, sizeof(struct at_flow), cg, agent))
		st->owner_known = 1;
	if (st->blocked)
		return plen ? 0 : 1;  /* every later segment of a blocked flow; a bare FIN/ACK may close it */

	u8 d = dir & 1, od = d ^ 1;
	struct at_flow_asm_key k = {}, ok = {};
	k.cookie = ok.cookie = cookie;
	k.dir = d;
	ok.dir = od;
	/* The peer sent data: the other way may have said all it will before it hears back (a
	 * short request), so userspace gets what it collected so far — flagged `flushed` — while
	 * the capture goes on: a peer that speaks first must not end the other side's check. */
	if ((plen || fin) && st->pending[od] && !st->interim[od]) {
		struct at_flow_asm *oa = flow_asm.lookup(&ok);
		if (oa) {
			oa->rec.fflags |= AT_FLOWF_FLUSHED;
			if (events.ringbuf_output(&oa->rec, sizeof(oa->rec), at_wake_flags()) < 0)
				at_count_drop(agent, AT_EV_FLOW);
			oa->rec.fflags &= ~AT_FLOWF_FLUSHED;
		}
		st->interim[od] = 1;
	}
	if (st->seen[d])
		return 1;
	if (plen == 0) {
		if (fin && st->pending[d]) {
			struct at_flow_asm *a = flow_asm.lookup(&k);
			if (a) {
				a->rec.fflags |= AT_FLOWF_FLUSHED;
				at_flow_send(a, &k, agent);
			}
			st->pending[d] = 0;
			st->seen[d] = 1;
		}
		return 1;  /* SYN, pure ACK, FIN */
	}

	struct at_flow_asm *a = 0;
	u16 lost = 0;
	if (st->pending[d]) {
		a = flow_asm.lookup(&k);
		if (!a)
			lost = AT_FLOWF_LOST;  /* evicted under pressure: start again from this segment */
	}
	if (!a) {
		u32 zero = 0;
		struct at_flow_asm *fresh = flow_scratch.lookup(&zero);
		if (!fresh)
			return 1;
		struct at_flow *e = &fresh->rec;
		at_flow_owner_header(&e->h, st->owner_known ? &st->owner : 0, AT_EV_FLOW, sizeof(*e), cg, agent);
		e->cookie = cookie;
		e->family = l.family;
		e->sport = sport;
		e->dport = dport;
		e->direction = dir;
		e->verdict = AT_VERDICT_ALLOWED;
		e->len = 0;
		e->proto_hint = AT_PROTO_UNKNOWN;
		__builtin_memcpy(e->saddr, l.saddr, 16);
		__builtin_memcpy(e->daddr, l.daddr, 16);
		e->skipped = 0;
		e->segs = 0;
		e->fflags = lost;
		fresh->next_seq = seq;
		flow_asm.update(&k, fresh);
		a = flow_asm.lookup(&k);
		if (!a)
			return 1;
		st->pending[d] = 1;
	}

	/* Where this segment's new bytes start: retransmitted bytes are skipped, a segment that
	 * arrived ahead of a missing one is not taken (the missing one will come again). */
	a->rec.segs++;
	s32 ahead = (s32)(seq - a->next_seq);
	if (ahead > 0) {
		a->rec.fflags |= AT_FLOWF_GAP;
		goto out_final;
	}
	u32 k0 = (u32)(-ahead);
	if (k0 >= plen)
		return 1;  /* a retransmission: nothing new */
	if (a->rec.segs > 1)
		a->rec.fflags |= AT_FLOWF_REASSEMBLED;
	u32 pos = off + k0;
	u32 avail = plen - k0;

	/* Leading whitespace is not captured: padding cannot push the telling bytes out. */
	if (a->rec.len == 0) {
		for (int c = 0; c < AT_FLOW_SKIP_CHUNKS; c++) {
			u32 have = a->rec.skipped;
			if (avail == 0 || have >= AT_FLOW_SKIP_MAX)
				break;
			u32 n = avail < AT_FLOW_CHUNK ? avail : AT_FLOW_CHUNK;
			n = ((n - 1) & (AT_FLOW_CHUNK - 1)) + 1;
			if (bpf_skb_load_bytes(skb, pos, a->slack, n) < 0)
				break;
			u32 j = at_ws_run(a->slack, n);
			a->tmp = j;
			j = *(volatile u32 *)&a->tmp;
			if (j > AT_FLOW_CHUNK)
				break;
			pos += j;
			avail -= j;
			a->next_seq += j;
			a->rec.skipped += j;
			if (j) {
				a->rec.fflags |= AT_FLOWF_PADDED;
				if (a->rec.skipped >= AT_FLOW_SKIP_MAX)
					a->rec.fflags |= AT_FLOWF_PAD_LIMIT;
			}
			if (j < n)
				break;
		}
	}
	if (avail) {
		u32 have = *(volatile u32 *)&a->rec.len;
		if (have < AT_FLOW_BYTES) {
			u32 room = AT_FLOW_BYTES - have;
			u32 n = avail < room ? avail : room;
			n = ((n - 1) & (AT_FLOW_BYTES - 1)) + 1;
			if (bpf_skb_load_bytes(skb, pos, &a->rec.data[have & (AT_FLOW_BYTES - 1)], n) == 0) {
				a->rec.len = have + n;
				a->next_seq += n;
			}
		}
	}

	/* Classification (at_flow_decide) and then the verdict and send (at_flow_finish) run in
	 * programs of their own, reached by tail call: each is verified once from a clean state
	 * instead of once per way the code before it can end (522k verified instructions per way
	 * before the split; docs/STARTUP.md has the figures since). The loader fills both slots of
	 * both arrays; a missing entry would let the segment pass undecided, so loading fails
	 * instead (tracer/kernel/loader.py TAIL_CALLS). */
	if (dir == AT_DIR_EGRESS)
		flow_egress_next.call(skb, 0);
	else
		flow_ingress_next.call(skb, 0);
	return 1;

out_final:
	a->rec.fflags |= AT_FLOWF_FLUSHED;
	st->pending[d] = 0;
	st->seen[d] = 1;
	at_flow_send(a, &k, agent);
	return 1;
}


/* The verdict of the concerns skb.c ran before at_flow on this packet (common.h at_skb_ctx):
 * the tail-called halves end the packet's program, so they return it combined with their own. */
static __always_inline u32 at_flow_prior(struct __sk_buff *skb)
{
	return skb->cb[AT_SKB_CB_VERDICT] & 1;
}

/* The second half of at_flow: classify the capture so far, apply the protocol policy, and send
 * the record once decided. Reached only by tail call from at_flow with the capture stored. */
static __always_inline int at_flow_decide(struct __sk_buff *skb, u8 dir)
{
	u64 cookie = bpf_get_socket_cookie(skb);
	struct at_flow_state *st = flow_state.lookup(&cookie);
	if (!st)
		return at_flow_prior(skb);
	u8 d = dir & 1;
	struct at_flow_asm_key k = {};
	k.cookie = cookie;
	k.dir = d;
	struct at_flow_asm *a = flow_asm.lookup(&k);
	if (!a)
		return at_flow_prior(skb);
	u64 agent = a->rec.h.agent_cgroup_id;
	u8 fin = 0;
	struct at_l3 l;
	u8 tcph[20];
	if (at_skb_l3(skb, &l) == 0 && bpf_skb_load_bytes(skb, l.l4off, tcph, 20) == 0)
		fin = tcph[13] & 0x05;

	u32 pre = 0;
	u32 cls = at_classify(&a->rec, &pre);
	/* the verdict and the send follow in a third program: each way the classifier can end
	 * goes on only through these few instructions (verification, docs/STARTUP.md) */
	a->tmp = cls | (pre ? AT_CLASS_PREBANNER : 0);
	if (dir == AT_DIR_EGRESS)
		flow_egress_next.call(skb, 1);
	else
		flow_ingress_next.call(skb, 1);
	return at_flow_prior(skb);
}

static __always_inline int at_flow_finish(struct __sk_buff *skb, u8 dir)
{
	u64 cookie = bpf_get_socket_cookie(skb);
	struct at_flow_state *st = flow_state.lookup(&cookie);
	if (!st)
		return at_flow_prior(skb);
	u8 d = dir & 1;
	struct at_flow_asm_key k = {};
	k.cookie = cookie;
	k.dir = d;
	struct at_flow_asm *a = flow_asm.lookup(&k);
	if (!a)
		return at_flow_prior(skb);
	u64 agent = a->rec.h.agent_cgroup_id;
	u8 fin = 0;
	struct at_l3 l;
	u8 tcph[20];
	if (at_skb_l3(skb, &l) == 0 && bpf_skb_load_bytes(skb, l.l4off, tcph, 20) == 0)
		fin = tcph[13] & 0x05;
	u32 cls = a->tmp;
	u32 pre = cls & AT_CLASS_PREBANNER;
	u32 proto = cls & 0xff;
	a->rec.proto_hint = proto;
	if (pre)
		a->rec.fflags |= AT_FLOWF_PREBANNER;
	if (!(cls & AT_CLASS_FINAL) && !fin)
		return at_flow_prior(skb);
	if (!(cls & AT_CLASS_FINAL))
		a->rec.fflags |= AT_FLOWF_FLUSHED;

	u32 policy = 0;
	/* the remote end is the destination of egress and the source of ingress */
	u32 verdict = dir == AT_DIR_EGRESS ? at_flow_verdict(agent, proto, a->rec.daddr, a->rec.dport, &policy)
					   : at_flow_verdict(agent, proto, a->rec.saddr, a->rec.sport, &policy);
	a->rec.verdict = verdict;
	if (verdict == AT_VERDICT_BLOCKED) {
		st->blocked = 1;
		st->policy_id = policy;
	}
	st->pending[d] = 0;
	st->seen[d] = 1;
	at_flow_send(a, &k, agent);
	return verdict == AT_VERDICT_BLOCKED ? 0 : at_flow_prior(skb);

}


int at_flow_finish_egress(struct __sk_buff *skb) { return at_flow_finish(skb, AT_DIR_EGRESS); }
int at_flow_finish_ingress(struct __sk_buff *skb) { return at_flow_finish(skb, AT_DIR_INGRESS); }

int at_flow_decide_egress(struct __sk_buff *skb) { return at_flow_decide(skb, AT_DIR_EGRESS); }
int at_flow_decide_ingress(struct __sk_buff *skb) { return at_flow_decide(skb, AT_DIR_INGRESS); }

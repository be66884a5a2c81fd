/* Maps and helpers shared by every probe in the compile unit (probes/agenttrace.c). */
#ifndef AGENTTRACE_COMMON_H
#define AGENTTRACE_COMMON_H

#include "agenttrace.h"

#ifndef AT_RINGBUF_PAGES
#define AT_RINGBUF_PAGES 4096   /* 16 MiB: a 10k-exec burst of ~300-byte records fits with room */
#endif
#ifndef AT_MAX_DEPTH
#define AT_MAX_DEPTH 16         /* cgroup nesting levels searched for a watched ancestor */
#endif
#ifndef AT_MAX_WATCHED
#define AT_MAX_WATCHED 1024
#endif

/* One ring buffer for every probe: userspace sees one ordered stream. */
BPF_RINGBUF_OUTPUT(events, AT_RINGBUF_PAGES);
/* Runtime switches, AT_CFG_* in agenttrace.h: one map for every probe family. */
BPF_ARRAY(at_config, u32, AT_CFG__MAX);

static __always_inline u32 at_cfg(u32 idx)
{
	u32 *v = at_config.lookup(&idx);
	return v ? *v : 0;
}

/* Fail-closed (enforce mode, pinned programs): [0] armed, [1] last heartbeat (ktime ns) the
 * tracer wrote, [2] grace ns. Once armed and the heartbeat is older than the grace, every
 * non-loopback destination of an agent is denied (net.c) and every exec in an agent is killed
 * (proc.c): a killed tracer leaves no open door, nor a way to start what its rules would judge. */
#define AT_FAILCLOSED_POLICY 0xffffffffu
BPF_ARRAY(heartbeat, u64, 3);

/* `now`: 0 where the caller has not read the clock (it is read only once armed) */
static __always_inline int at_tracer_dead(u64 now)
{
	u32 k0 = 0, k1 = 1, k2 = 2;
	u64 *armed = heartbeat.lookup(&k0);
	if (!armed || !*armed)
		return 0;
	u64 *last = heartbeat.lookup(&k1), *grace = heartbeat.lookup(&k2);
	if (!last || !grace)
		return 0;
	return (now ? now : bpf_ktime_get_ns()) - *last > *grace;
}

/* Reader wakeups. Waking the reader is an irq_work self-interrupt that the kernel raises inside
 * the submitting program; on this project's VMs it measured ~20 us per record (bench/
 * ringbuf_wakeup.py), more than everything else a probe does. So records are submitted with
 * BPF_RB_NO_WAKEUP except the first after AT_WAKE_NS of quiet on this CPU (a lone event is seen
 * at once) and every AT_WAKE_BATCH-th (a burst never waits long in a small ring); the reader
 * polls with an AT_WAKE_NS timeout and then consumes, so no record waits longer than that.
 * Quiet is measured from this CPU's previous record, not from its previous wakeup: a steady
 * storm of one record per millisecond would otherwise wake the reader every AT_WAKE_NS (200
 * self-interrupts a second per CPU, ~1 in 8 records of an exec storm) for records the reader's
 * own timeout collects anyway.
 * AT_WAKE_NS 0 restores the kernel's default (wake on every record the reader is waiting for). */
#ifndef AT_WAKE_NS
#define AT_WAKE_NS 5000000ULL
#endif
#ifndef AT_WAKE_BATCH
#define AT_WAKE_BATCH 64
#endif
struct at_wake { u64 last_ns; u64 count; };   /* last_ns: this CPU's previous record */
BPF_PERCPU_ARRAY(wake_state, struct at_wake, 1);

/* `now`: the record's own time where the caller has one (a clock read is ~35 ns here, more than
 * the rest of this helper) */
static __always_inline u64 at_wake_flags_at(u64 now)
{
#if AT_WAKE_NS == 0
	return 0;
#else
	u32 zero = 0;
	struct at_wake *w = wake_state.lookup(&zero);
	if (!w)
		return 0;
	u64 gap = now - w->last_ns;
	w->last_ns = now;
	if (++w->count >= AT_WAKE_BATCH || gap >= AT_WAKE_NS) {
		w->count = 0;
		/* forced: records held back before this one mean the reader is behind, and the
		 * kernel's own rule wakes only a reader that has caught up */
		return BPF_RB_FORCE_WAKEUP;
	}
	return BPF_RB_NO_WAKEUP;
#endif
}

static __always_inline u64 at_wake_flags(void)
{
	return at_wake_flags_at(bpf_ktime_get_ns());
}

/* The reader's doorbell. While records keep coming the reader sleeps between reads, up to
 * --batch-wait-ms (ringbuf.RingReader's gap: `events` cannot wake it there, its poll is ready
 * whenever records wait), and a record that userspace must act on -- an escape it judges, an
 * exec or connect a userspace kill rule may match -- would wait that long. A 1-page ring of
 * its own that holds nothing else can wake it: the reader waits on it through the gap (and
 * empties it at each read), so such a record is read within the wakeup interval whatever the
 * batch wait (the reader keeps that floor after a ring, doubling up to 15 ms for rings in a
 * row, so a storm of them is read as often as before, not per record). Rung only when empty: a ring holds one record at most (AT_BELL_SZ: two do not
 * fit in its page), so a reservation fails while the last ring is unread and the wakeup's
 * irq_work (~20 us) is paid once per read, not per record. Never read (a pinned program
 * outliving the tracer) it stays rung and costs a failed reservation. */
BPF_RINGBUF_OUTPUT(at_doorbell, 1);
/* with its 8-byte header half the ring's 4,096 bytes: the kernel keeps the producer less than
 * the ring's size ahead of the consumer, so a second reservation (4,096 ahead) fails.
 * ringbuf.BELL_RECORD mirrors it (rings counted from the producer position). */
#define AT_BELL_SZ 2040

static __always_inline void at_ring_doorbell(void)
{
	u64 *b = at_doorbell.ringbuf_reserve(AT_BELL_SZ);
	if (!b)
		return;
	*b = 1;
	at_doorbell.ringbuf_submit(b, BPF_RB_FORCE_WAKEUP);
}

/* The late bell, the same for records that only may need a decision: an exec from outside the
 * system directories (a renamed copy of a tool, which userspace tells by its content) and a
 * connect (userspace matches it by the name the agent resolved). The reader ends its gap at
 * this bell where the batch wait ended before the doorbell (ringbuf.LATE_BELL_MS), so such a
 * kill is no slower than it was, while a storm of system binaries still gathers into the full
 * batch wait. */
BPF_RINGBUF_OUTPUT(at_doorbell_late, 1);

static __always_inline void at_ring_doorbell_late(void)
{
	u64 *b = at_doorbell_late.ringbuf_reserve(AT_BELL_SZ);
	if (!b)
		return;
	*b = 1;
	at_doorbell_late.ringbuf_submit(b, BPF_RB_FORCE_WAKEUP);
}

/* Watched cgroup id -> its level. Every descendant, including cgroups made later, is in scope
 * because the check walks the current task's ancestors. */
BPF_HASH(watched, u64, u32, AT_MAX_WATCHED);
/* [0]: the cgroup level of the shallowest watched cgroup (tracer/kernel/loader.py lowers it
 * before it adds a shallower one). No task above that level is in scope, so the walks below
 * start there, not at the root: a look-up and a helper call fewer per level skipped, in every
 * probe that asks (connect, socket, fork, exec, exit...). 0, before the first watch, walks
 * from the root. */
BPF_ARRAY(watch_from, u32, 1);

static __always_inline u32 at_watch_from(void)
{
	u32 zero = 0;
	u32 *f = watch_from.lookup(&zero);
	u32 from = f ? *f : 0;
	return from < 256 ? from : 0;
}

/* Ring-buffer reserve failures per agent and event type; per-CPU so counting needs no atomics. */
BPF_TABLE("lru_percpu_hash", struct at_drop_key, u64, drops, 4096);

/* Returns 1 when the current task is inside a watched subtree and sets its cgroup and its agent's
 * cgroup (the watched cgroup's direct child on the task's path, or the watched cgroup itself). */
static __always_inline int at_scope(u64 *cg, u64 *agent)
{
	u32 from = at_watch_from();
	#pragma unroll
	for (int i = 0; i < AT_MAX_DEPTH; i++) {
		u32 lvl = from + i;
		u64 id = bpf_get_current_ancestor_cgroup_id(lvl);
		if (id == 0)
			return 0;
		if (watched.lookup(&id)) {
			u64 a = bpf_get_current_ancestor_cgroup_id(lvl + 1);
			*agent = a ? a : id;
			*cg = bpf_get_current_cgroup_id();
			return 1;
		}
	}
	return 0;
}

#ifdef AT_WITH_PROC
/* Who forked each process in scope (AT_FORKF_* in agenttrace.h), written by proc.c at
 * sched_process_fork. With fork records off this is where the creator chain lives: the exec
 * record carries the creator, userspace reads entries for processes it meets without an exec.
 * 65536 entries (24 bytes each, ~2 MiB): the proc table's own bound, so every process userspace
 * can remember has its entry; an LRU so a fork storm ages old entries out instead of failing. */
#ifndef AT_FORK_ENTRIES
#define AT_FORK_ENTRIES 65536
#endif
BPF_TABLE("lru_hash", u32, struct at_fork_entry, proc_forks, AT_FORK_ENTRIES);
BPF_TABLE("lru_percpu_hash", u64, struct at_proc_count, proc_counts, 4096);
#define AT_SEEN_DEPTH 8   /* creator levels marked: the ancestry userspace builds (ANCESTRY_DEPTH) */

/* A record names this process (or a descendant exec'd): it and its not-yet-seen creators get
 * their exit reported. Marked here, in the kernel, and not by userspace when it reads the record:
 * a worker that connects and exits within one reader wakeup would otherwise lose its exit. */
static __always_inline void at_mark_seen(u32 tgid)
{
	#pragma unroll
	for (int i = 0; i < AT_SEEN_DEPTH; i++) {
		struct at_fork_entry *f = proc_forks.lookup(&tgid);
		if (!f || (f->flags & AT_FORKF_SEEN))
			return;
		if (i == 0 && (f->flags & AT_FORKF_EXITED)) {
			/* the running process's own pid, marked exited: a reused pid of a process
			 * forked outside scope, so the entry is someone else's */
			proc_forks.delete(&tgid);
			return;
		}
		/* a creator that exited unseen gets no exit record any more, but is named in
		 * this ancestry: userspace reads its entry */
		f->flags |= AT_FORKF_SEEN;
		tgid = f->creator;
		if (!tgid)
			return;
	}
}

static __always_inline struct at_proc_count *at_proc_count(u64 agent)
{
	struct at_proc_count zero = {};
	return proc_counts.lookup_or_try_init(&agent, &zero);
}
#endif

/* `now`: the record's time where the caller has read the clock already (see at_wake_flags_at) */
static __always_inline void at_fill_header_at(struct at_header *h, u16 type, u16 size, u64 cg, u64 agent, u64 now)
{
	u64 pt = bpf_get_current_pid_tgid();
#ifdef AT_WITH_PROC
	at_mark_seen(pt >> 32);
#endif
	h->type = type;
	h->size = size;
	h->pid = (u32)pt;
	h->tgid = pt >> 32;
	h->uid = (u32)bpf_get_current_uid_gid();
	h->ktime = now;
	h->cgroup_id = cg;
	h->agent_cgroup_id = agent;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
}

static __always_inline void at_fill_header(struct at_header *h, u16 type, u16 size, u64 cg, u64 agent)
{
	at_fill_header_at(h, type, size, cg, agent, bpf_ktime_get_ns());
}

static __always_inline void at_count_drop(u64 agent, u32 type)
{
	struct at_drop_key k = {};
	u64 zero = 0, *c;
	k.agent_cgroup_id = agent;
	k.type = type;
	c = drops.lookup_or_try_init(&k, &zero);
	if (c)
		(*c)++;
}

/* Per-agent admission: a token bucket so one flooding agent (fork or connect storm) cannot
 * fill the ring buffer and blind agenttrace to the others. [0] events/s per agent
 * (0 = unlimited), [1] burst. What is refused is counted per agent with this flag set in
 * the drop type, so userspace can tell rate limiting from a full buffer. Enforcement
 * decisions (kills, blocks) are taken before admission and never skipped. */
#define AT_DROP_RATE_LIMITED 0x8000
BPF_ARRAY(rate_cfg, u64, 2);
struct at_rate { u64 last_ns; u64 tokens; };
BPF_TABLE("lru_hash", u64, struct at_rate, rate_state, 8192);

/* `key` selects the bucket: the agent's own id, or AT_POLICY_BUCKET | id for records a rule
 * names (proc.c exec_watch hits, net.c policy hits), so an agent's flood of ordinary events
 * cannot use up the budget of the records the rules act on, and a flood of those is still
 * bounded and counted. */
#define AT_POLICY_BUCKET (1ULL << 63)
static __always_inline int at_admit_key_at(u64 agent, u64 key, u32 type, u64 now)
{
	u32 k0 = 0, k1 = 1;
	u64 *lim = rate_cfg.lookup(&k0);
	if (!lim || *lim == 0)
		return 1;
	u64 limit = *lim;
	u64 *bp = rate_cfg.lookup(&k1);
	u64 burst = bp && *bp ? *bp : limit;
	struct at_rate *r = rate_state.lookup(&key);
	if (!r) {
		struct at_rate n = {now, burst - 1};
		rate_state.update(&key, &n);
		return 1;
	}
	u64 elapsed = now - r->last_ns;
	/* approximate across CPUs by design: a lost update costs one token, not correctness */
	u64 add = elapsed > 10000000000ULL ? burst : elapsed * limit / 1000000000ULL;
	if (add) {
		u64 t = r->tokens + add;
		r->tokens = t > burst ? burst : t;
		r->last_ns = now;
	}
	if (r->tokens == 0) {
		at_count_drop(agent, type | AT_DROP_RATE_LIMITED);
		return 0;
	}
	r->tokens--;
	return 1;
}

static __always_inline int at_admit_key(u64 agent, u64 key, u32 type)
{
	return at_admit_key_at(agent, key, type, bpf_ktime_get_ns());
}

static __always_inline int at_admit(u64 agent, u32 type)
{
	return at_admit_key(agent, agent, type);
}

#if defined(AT_WITH_NET) || defined(AT_WITH_FLOW)
/* Shared by the connect (net.c) and flow (flow.c) policies, filled by one writer
 * (tracer/kernel/maps.py): destination scope of an address (IPv4 mapped into ::ffff:a.b.c.d, longest
 * prefix wins, no entry = external), each agent's policy group, and the enforce flag. */
#define AT_SCOPE_LOOPBACK 1
#define AT_SCOPE_INTERNAL 2
#define AT_SCOPE_METADATA 4
#define AT_SCOPE_EXTERNAL 8
struct at_scope_key { u32 prefixlen; u8 addr[16]; };
BPF_LPM_TRIE(scopes, struct at_scope_key, u32, 1024);
BPF_HASH(agent_group, u64, u32, 4096);
#endif

#if defined(AT_WITH_FLOW) || defined(AT_WITH_DNS) || defined(AT_WITH_EGRESS) || defined(AT_WITH_ICMP)
/* Shared by the cgroup_skb probes (flow.c, dns.c, egress.c). */
#define AT_ETH_P_IP   0x0800
#define AT_ETH_P_IPV6 0x86DD
#define AT_SKB_AF_INET 2
#define AT_SKB_AF_INET6 10
/* The agent of a socket: walk the socket's cgroup ancestors (not the current task's — skb
 * hooks also run in softirq) for a watched one. */
static __always_inline int at_skb_scope(struct __sk_buff *skb, u64 *cg, u64 *agent)
{
	u32 from = at_watch_from();
	#pragma unroll
	for (int i = 0; i < AT_MAX_DEPTH; i++) {
		u32 lvl = from + i;
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

/* The fields of at_l3 from the fixed IP header's bytes (20 for IPv4, 40 for IPv6). */
static __always_inline int at_l3_parse(struct __sk_buff *skb, const u8 *ip, struct at_l3 *l)
{
	__builtin_memset(l, 0, sizeof(*l));
	if (skb->protocol == bpf_htons(AT_ETH_P_IP)) {
		l->family = AT_SKB_AF_INET;
		l->proto = ip[9];
		l->l4off = (ip[0] & 0xf) * 4;
		l->l3end = ((u32)ip[2] << 8) | ip[3];
		l->saddr[10] = l->saddr[11] = 0xff;
		l->daddr[10] = l->daddr[11] = 0xff;
		__builtin_memcpy(&l->saddr[12], &ip[12], 4);
		__builtin_memcpy(&l->daddr[12], &ip[16], 4);
		return 0;
	}
	if (skb->protocol == bpf_htons(AT_ETH_P_IPV6)) {
		l->family = AT_SKB_AF_INET6;
		l->proto = ip[6];
		l->l4off = 40;
		l->l3end = 40 + (((u32)ip[4] << 8) | ip[5]);
		__builtin_memcpy(l->saddr, &ip[8], 16);
		__builtin_memcpy(l->daddr, &ip[24], 16);
		return 0;
	}
	return -1;
}

static __always_inline int at_skb_l3(struct __sk_buff *skb, struct at_l3 *l)
{
	u8 ip[40];
	if (skb->protocol == bpf_htons(AT_ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, ip, 20) < 0)
			return -1;
	} else if (skb->protocol == bpf_htons(AT_ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 0, ip, 40) < 0)
			return -1;
	} else {
		return -1;
	}
	return at_l3_parse(skb, ip, l);
}

/* What the one cgroup_skb program of each direction (skb.c) works out once for every concern
 * it runs (tls, icmp, dns, flow): before, each concern was a program of its own and parsed the
 * headers, took the socket cookie and walked the cgroups again.
 *
 * The verdict so far and the cgroup walk's answer live in skb->cb[] (the kernel zeroes it before
 * the program and restores it after; a tail call keeps it), not on the stack: the verifier knows
 * nothing of cb's contents, so every way one concern can end joins the next concern in one
 * state, and flow.c's heavy code is verified once instead of once per such way (a stack copy
 * of them made at_skb_egress 778k verified instructions).
 * cb[0]: verdict so far (bit 0); cb[1]: 0 not walked, 1 in scope, 2 not; cb[2], cb[3]: agent;
 * cb[4]: bytes of the transport header in at_skb_ctx.l4 (20, 8, 1, or 0 when shorter). */
#define AT_SKB_CB_VERDICT 0
#define AT_SKB_CB_SCOPE 1
#define AT_SKB_CB_L4LEN 4
struct at_skb_ctx {
	u8 ip[40];          /* the fixed IP header: 20 bytes (IPv4) or 40 (IPv6) */
	u8 l4[20];          /* the transport header: TCP (20 bytes), UDP (8), ICMP (the type) */
	u64 cookie;
};
/* Each concern derives its own at_l3 from the bytes (a few instructions): one kept on the
 * stack for all of them would carry the bounds one concern's compares put on its fields
 * into the next concern, and the verifier would check that one once per set of bounds. */
#define AT_SKB_L3(skb, c, l) at_l3_parse((skb), (c)->ip, (l))
#define AT_SKB_L4LEN(skb) ((skb)->cb[AT_SKB_CB_L4LEN])

static __always_inline int at_skb_scope_c(struct __sk_buff *skb, u64 *cg, u64 *agent)
{
	u32 s = skb->cb[AT_SKB_CB_SCOPE];
	if (s == 0) {
		int in = at_skb_scope(skb, cg, agent);
		skb->cb[AT_SKB_CB_SCOPE] = in ? 1 : 2;
		skb->cb[2] = (u32)*agent;
		skb->cb[3] = (u32)(*agent >> 32);
		return in;
	}
	if (s != 1)
		return 0;
	*agent = ((u64)skb->cb[3] << 32) | skb->cb[2];
	*cg = bpf_skb_cgroup_id(skb);
	return 1;
}

/* This concern drops the packet: any drop drops, as when each concern was a program. */
static __always_inline void at_skb_drop(struct __sk_buff *skb)
{
	skb->cb[AT_SKB_CB_VERDICT] = 0;
}

#endif /* AT_WITH_FLOW || AT_WITH_DNS || AT_WITH_EGRESS || AT_WITH_ICMP */

#endif

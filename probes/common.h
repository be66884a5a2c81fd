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

/* Watched cgroup id -> its level. Every descendant, including cgroups made later, is in scope
 * because the check walks the current task's ancestors. */
BPF_HASH(watched, u64, u32, AT_MAX_WATCHED);

/* Ring-buffer reserve failures per agent and event type; per-CPU so counting needs no atomics. */
BPF_TABLE("lru_percpu_hash", struct at_drop_key, u64, drops, 4096);

/* Returns 1 when the current task is inside a watched subtree and sets its cgroup and its agent's
 * cgroup (the watched cgroup's direct child on the task's path, or the watched cgroup itself). */
static __always_inline int at_scope(u64 *cg, u64 *agent)
{
	#pragma unroll
	for (int lvl = 0; lvl < AT_MAX_DEPTH; lvl++) {
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

static __always_inline void at_fill_header(struct at_header *h, u16 type, u16 size, u64 cg, u64 agent)
{
	u64 pt = bpf_get_current_pid_tgid();
	h->type = type;
	h->size = size;
	h->pid = (u32)pt;
	h->tgid = pt >> 32;
	h->uid = (u32)bpf_get_current_uid_gid();
	h->ktime = bpf_ktime_get_ns();
	h->cgroup_id = cg;
	h->agent_cgroup_id = agent;
	bpf_get_current_comm(h->comm, sizeof(h->comm));
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

static __always_inline int at_admit(u64 agent, u32 type)
{
	u32 k0 = 0, k1 = 1;
	u64 *lim = rate_cfg.lookup(&k0);
	if (!lim || *lim == 0)
		return 1;
	u64 limit = *lim;
	u64 *bp = rate_cfg.lookup(&k1);
	u64 burst = bp && *bp ? *bp : limit;
	u64 now = bpf_ktime_get_ns();
	struct at_rate *r = rate_state.lookup(&agent);
	if (!r) {
		struct at_rate n = {now, burst - 1};
		rate_state.update(&agent, &n);
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

#endif

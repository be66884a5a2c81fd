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

#endif

/* Escape detection: an agent process that leaves the watched cgroup subtree (a write to
 * another cgroup's cgroup.procs) stops being seen by every cgroup hook, so leaving is itself
 * the violation.
 *
 * What cgroup:cgroup_attach_task gives here (kernel 6.18, measured): it fires after the
 * migration, in the writer's context, with the moved process's pid, the destination cgroup's
 * id, level and path -- but nothing about where the process came from, and when a process
 * moves itself `current` is already in the destination. So membership is kept in the kernel:
 * `agent_tasks` holds every process forked or exec'd inside a watched subtree (and those
 * userspace finds there at watch time), and the move is judged against it:
 *  - a process moving itself out: reported and, in enforce mode, SIGKILLed from the
 *    tracepoint -- the signal is pending before write() returns, so it never runs outside;
 *  - a process moved by another (an agent moving a sibling, or any writer moving an agent
 *    process): reported with the destination path; userspace decides whether that path is
 *    outside the watched subtrees and kills it in enforce mode (not in the kernel: the
 *    destination's ancestry is not available to a tracepoint program);
 *  - clone3(CLONE_INTO_CGROUP) puts a child straight into another cgroup without an attach:
 *    sched_process_fork fires before the child first runs, and the child's cgroup (read at
 *    BTF offsets: no helper names another task's cgroup) differs from its parent's. That is
 *    reported at once and userspace judges the destination (kills it in enforce mode, as for a
 *    process moved by another); the child is also caught at its first exec, killed there in
 *    the kernel. On a kernel without those BTF fields only the exec catch remains.
 * Needs the proc feature's BTF offsets (AT_OFF_TASK_*); its fork, exec and exit work runs
 * inside proc.c's programs for those hooks (at_esc_forked, at_esc_execed, at_esc_exited), whose
 * links are pinned with this file's own in the daemon's fail-closed mode. */

#ifndef AT_ESC_TASKS
#define AT_ESC_TASKS 65536
#endif
BPF_TABLE("lru_hash", u32, u64, agent_tasks, AT_ESC_TASKS);
BPF_PERCPU_ARRAY(escape_scratch, struct at_escape, 1);

static __always_inline u32 at_esc_enforce(void)
{
	return at_cfg(AT_CFG_ENFORCE);
}

static __always_inline void at_esc_emit(u64 cg, u64 from_agent, u32 moved, u32 flags,
					u64 dst_id, s32 dst_level, void *args_base, u32 path_loc)
{
	u32 zero = 0;
	struct at_escape *e = escape_scratch.lookup(&zero);
	if (!e)
		return;
	at_fill_header(&e->h, AT_EV_ESCAPE, sizeof(*e), cg, from_agent);
	e->dst_cgroup_id = dst_id;
	e->moved_tgid = moved;
	e->writer_tgid = e->h.tgid;
	e->dst_level = dst_level;
	e->flags = flags;
	e->dst_path[0] = 0;
	if (args_base)
		bpf_probe_read_kernel_str(e->dst_path, sizeof(e->dst_path), args_base + (path_loc & 0xffff));
	if (events.ringbuf_output(e, sizeof(*e), BPF_RB_FORCE_WAKEUP) < 0) {
		at_count_drop(from_agent, AT_EV_ESCAPE);
		return;
	}
	if (!(flags & AT_ESC_KILLED))
		at_ring_doorbell();     /* userspace must judge and kill it: read it now */
}

#ifdef AT_OFF_KERNFS_NODE_ID
/* what bpf_get_current_cgroup_id() computes, for a task that is not current */
static __always_inline u64 at_task_cgroup_id(void *task)
{
	void *cset = 0, *cgrp = 0, *kn = 0;
	u64 id = 0;
	bpf_probe_read_kernel(&cset, sizeof(cset), task + AT_OFF_TASK_CGROUPS);
	if (!cset)
		return 0;
	bpf_probe_read_kernel(&cgrp, sizeof(cgrp), cset + AT_OFF_CSS_SET_DFL_CGRP);
	if (!cgrp)
		return 0;
	bpf_probe_read_kernel(&kn, sizeof(kn), cgrp + AT_OFF_CGROUP_KN);
	if (!kn)
		return 0;
	bpf_probe_read_kernel(&id, sizeof(id), kn + AT_OFF_KERNFS_NODE_ID);
	return id;
}
#endif

/* Escape's share of the sched hooks, run by proc.c's programs for them (this file comes
 * first in the compile unit): one program per hook does both families' work, so the scope
 * check and the child's ids are read once. Membership stays in a map of its own and is not
 * derived from proc_forks: that one keeps the entries of fork-only processes after they exit
 * (an orphan's ancestry names them), so a storm of short-lived forks would age a quiet, long-
 * lived agent process out of it and its escape would go unseen; agent_tasks holds only the
 * living. */
static __always_inline void at_esc_forked(u64 cg, u64 agent, void *child, u32 ctgid)
{
	agent_tasks.update(&ctgid, &agent);
#ifdef AT_OFF_KERNFS_NODE_ID
	/* A fork child starts in its parent's cgroup; only CLONE_INTO_CGROUP places it elsewhere
	 * (maybe inside the subtree: a sub-cgroup the agent made, which userspace tells apart). */
	u64 ccg = at_task_cgroup_id(child);
	if (ccg && ccg != cg)
		at_esc_emit(cg, agent, ctgid, AT_ESC_AT_FORK, ccg, -1, 0, 0);
#endif
}

/* any process's exit, in scope or not (one moved out by another writer is still a member) */
static __always_inline void at_esc_exited(u32 tgid)
{
	/* a look-up first: nearly every exit on the machine has no entry, and a delete takes the
	 * bucket's lock even when there is nothing to delete */
	if (agent_tasks.lookup(&tgid))
		agent_tasks.delete(&tgid);
}

/* Every exec on the machine, inside a watched subtree or not (`inside`, `agent`: at_scope's
 * answer). Run by proc.c's exec program; a raw tracepoint of its own (AT_ESC_EXEC_PROG) where
 * that program's attachment cannot be pinned (loader: BCC's own attach, kernels before 5.15). */
static __always_inline void at_esc_execed(u32 tgid, int inside, u64 agent)
{
	u64 *from = agent_tasks.lookup(&tgid);
	if (inside) {
		/* a process moved in by a writer outside the subtree (a container runtime placing
		 * its init) had no fork here to record it: its first exec inside does */
		if (!from || *from != agent)
			agent_tasks.update(&tgid, &agent);
		return;
	}
	if (!from)
		return;
	u64 f = *from;
	u32 flags = AT_ESC_SELF | AT_ESC_AT_EXEC;
	if (at_esc_enforce()) {
		bpf_send_signal(9);
		flags |= AT_ESC_KILLED;
	}
	agent_tasks.delete(&tgid);
	at_esc_emit(bpf_get_current_cgroup_id(), f, tgid, flags, bpf_get_current_cgroup_id(), -1, 0, 0);
}

#ifdef AT_ESC_EXEC_PROG
int at_esc_exec(struct bpf_raw_tracepoint_args *ctx)
{
	u64 cg, agent = 0;
	int inside = at_scope(&cg, &agent);
	at_esc_execed(bpf_get_current_pid_tgid() >> 32, inside, agent);
	return 0;
}
#endif

TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
	u32 moved = args->pid;
	u32 me = bpf_get_current_pid_tgid() >> 32;
	u64 cg = 0, agent = 0;
	int inside = at_scope(&cg, &agent);
	u64 *prev = agent_tasks.lookup(&moved);
	u64 from = prev ? *prev : 0;
	if (moved == me) {
		if (inside) {
			agent_tasks.update(&moved, &agent);   /* entered, or moved within the subtree */
			return 0;
		}
		if (!from)
			return 0;
		u32 flags = AT_ESC_SELF;
		if (at_esc_enforce()) {
			bpf_send_signal(9);
			flags |= AT_ESC_KILLED;
		}
		agent_tasks.delete(&moved);
		at_esc_emit(bpf_get_current_cgroup_id(), from, moved, flags, args->dst_id, args->dst_level,
			    (void *)args, args->data_loc_dst_path);
		return 0;
	}
	if (!from && !inside)
		return 0;                 /* neither the writer nor the process is an agent's */
	at_esc_emit(inside ? cg : bpf_get_current_cgroup_id(), from ? from : agent, moved,
		    inside ? AT_ESC_WRITER_IN : 0, args->dst_id, args->dst_level,
		    (void *)args, args->data_loc_dst_path);
	return 0;
}

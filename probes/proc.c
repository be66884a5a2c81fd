/* Process lifecycle: fork, exec, exit of tasks inside watched cgroups.
 *
 * Why these hooks: sched:* tracepoints fire once per process event whatever syscall or
 * io_uring path caused it (execve, execveat, fexecve of a memfd all end in
 * sched_process_exec), and unlike syscall tracepoints they leave every other task on the
 * fast syscall path (docs/ARCHITECTURE.md §4).
 *
 * Kernel fields we cannot avoid (parent, argv, exit code) are read at offsets the loader
 * takes from the running kernel's BTF and passes as AT_OFF_* constants. */

#ifndef AT_OFF_TASK_PID
#error "loader must pass the task_struct/mm_struct offsets from BTF (AT_OFF_*)"
#endif

/* exec kill policy (enforce mode): the loader fills these from rules whose `match` names exec
 * paths or basenames; value is the policy id reported back in the event. */
struct at_path_key { char path[AT_PATH_MAX]; };
struct at_name_key { char name[AT_COMM_LEN]; };
BPF_HASH(kill_paths, struct at_path_key, u32, 1024);
/* [0]: 1 while kill_paths may hold an entry (tracer/kernel/maps.py sets it before the first and
 * clears it after the last is gone). Hashing the 256-byte key costs ~100 ns hot, more cold, for
 * every exec in scope, and the default pack names no exec path: an empty map is not asked. */
BPF_ARRAY(kill_paths_on, u32, 1);
BPF_HASH(kill_names, struct at_name_key, u32, 1024);
/* Basenames (as comm: first 15 bytes) that any rule's exec match names, kill or not: their
 * exec records are what userspace-decided rules act on (e.g. ssh with forwarding flags), so
 * they are admitted from the policy bucket, never lost in the agent's own flood. */
BPF_HASH(exec_watch, struct at_name_key, u32, 4096);

/* Where only root installs programs (/usr/..., /bin/..., /sbin/..., as the exec named them):
 * an agent's renamed copy of a tool lands elsewhere unless it runs as root. ld.so (/lib...) is
 * not one of them: `ld.so PROGRAM` runs whatever PROGRAM is. The kernel's copy of the path is
 * the one the exec passed, not resolved: `/usr/../tmp/x` starts with /usr/ and is not there, so
 * a path with a `.` or `..` component or an empty one (`//`) is not taken for a system path.
 * Only paths that pass the prefix test are scanned, one byte a step up to the NUL (the bytes
 * before it kept in three registers, so each step reads one byte and the verifier one bound);
 * a path that fills AT_PATH_MAX without a NUL is not taken either. */
static __always_inline int at_path_plain(const char *f)
{
	char c1 = 0, c2 = 0, c3 = 0;   /* the bytes before f[i], nearest first */
	for (int i = 0; i < AT_PATH_MAX; i++) {
		char c = f[i];
		if (c == '/' || c == 0) {
			/* the component that ends here: empty, `.` or `..` */
			if (c1 == '/' || (c1 == '.' && (c2 == '/' || (c2 == '.' && c3 == '/'))))
				return 0;
			if (c == 0)
				return 1;
		}
		c3 = c2;
		c2 = c1;
		c1 = c;
	}
	return 0;
}

/* One scan for the three prefixes, not one per prefix: each inlined call was a 256-step loop of
 * its own for the verifier (sched_process_exec verified 101,583 instructions, 33,369 now). */
static __always_inline int at_system_path(const char *f)
{
	if (f[0] != '/')
		return 0;
	if (!(f[1] == 'u' && f[2] == 's' && f[3] == 'r' && f[4] == '/') &&
	    !(f[1] == 'b' && f[2] == 'i' && f[3] == 'n' && f[4] == '/') &&
	    !(f[1] == 's' && f[2] == 'b' && f[3] == 'i' && f[4] == 'n' && f[5] == '/'))
		return 0;
	return at_path_plain(f);
}

/* The exec record is ~4.4 KiB, over the 512-byte BPF stack: build it in per-CPU scratch and
 * send only the bytes of argv actually read. */
BPF_PERCPU_ARRAY(exec_scratch, struct at_exec, 1);

static __always_inline u32 at_task_tgid(void *task)
{
	u32 v = 0;
	bpf_probe_read_kernel(&v, sizeof(v), task + AT_OFF_TASK_TGID);
	return v;
}

/* Counted for the agent and in the totals (key 0): summary and counters() stay exact when
 * fork and exit records stay in the kernel. */
#define AT_COUNT_PROC(agent, field) do {                        \
		struct at_proc_count *c_ = at_proc_count(agent);        \
		if (c_)                                                 \
			c_->field++;                                        \
		c_ = at_proc_count(0);                                  \
		if (c_)                                                 \
			c_->field++;                                        \
	} while (0)

/* One lookup of the agent's counts and of the totals for both fork counts (forks_quiet only
 * with fork records off). */
static __always_inline void at_count_forks(u64 agent, u32 quiet)
{
	struct at_proc_count *c = at_proc_count(agent);
	if (c) {
		c->forks++;
		c->forks_quiet += quiet;
	}
	c = at_proc_count(0);
	if (c) {
		c->forks++;
		c->forks_quiet += quiet;
	}
}

static __always_inline void at_proc_forked(u64 cg, u64 agent, u32 ctgid)
{
	/* the creator is the forking process, whoever reparents the child later (a double
	 * fork's grandchild ends up under init or a subreaper) */
	u64 now = bpf_ktime_get_ns();
	u32 records = at_cfg(AT_CFG_FORK_RECORDS);
	struct at_fork_entry fe = {};
	fe.creator = bpf_get_current_pid_tgid() >> 32;
	fe.ktime = now;
	/* a fork record tells userspace of the child: its exit is reported, as it always was */
	fe.flags = records ? AT_FORKF_SEEN : 0;
	proc_forks.update(&ctgid, &fe);
	at_count_forks(agent, !records);
	if (!records)
		return;
	if (!at_admit(agent, AT_EV_FORK))
		return;

	struct at_fork *e = events.ringbuf_reserve(sizeof(struct at_fork));
	if (!e) {
		at_count_drop(agent, AT_EV_FORK);
		return;
	}
	at_fill_header(&e->h, AT_EV_FORK, sizeof(*e), cg, agent);
	e->h.ktime = now;      /* the entry's time: a record and a lookup give the same exec_id */
	e->child_tgid = ctgid;
	e->parent_tgid = e->h.tgid;
	events.ringbuf_submit(e, at_wake_flags_at(e->h.ktime));
}

RAW_TRACEPOINT_PROBE(sched_process_fork)
{
	/* args: (struct task_struct *parent, struct task_struct *child). Threads share the
	 * parent's tgid; only new processes are reported. */
	void *child = (void *)ctx->args[1];
	u32 cpid = 0, ctgid = 0;
	u64 cg, agent;

	if (!at_scope(&cg, &agent))
		return 0;
	bpf_probe_read_kernel(&cpid, sizeof(cpid), child + AT_OFF_TASK_PID);
	ctgid = at_task_tgid(child);
	if (cpid != ctgid)
		return 0;
	at_proc_forked(cg, agent, ctgid);
#ifdef AT_WITH_ESCAPE
	at_esc_forked(cg, agent, child, ctgid);   /* after the fork record: the order it always had */
#endif
	return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
	u64 cg, agent = 0;
	u32 zero = 0;

	int inside = at_scope(&cg, &agent);
#if defined(AT_WITH_ESCAPE) && !defined(AT_ESC_EXEC_PROG)
	/* before the record: an exec outside the subtree is killed here (enforce) */
	at_esc_execed(bpf_get_current_pid_tgid() >> 32, inside, agent);
#endif
	if (!inside)
		return 0;
	struct at_exec *e = exec_scratch.lookup(&zero);
	if (!e)
		return 0;

	at_fill_header(&e->h, AT_EV_EXEC, 0, cg, agent);
	e->creator = 0;
	struct at_fork_entry *fe = proc_forks.lookup(&e->h.tgid);
	if (fe && (fe->flags & AT_FORKF_EXITED)) {
		/* an exited process cannot exec: the entry is an earlier holder's of this pid and
		 * this one was forked outside scope. Its creator is not this one's. */
		proc_forks.delete(&e->h.tgid);
		fe = 0;
	}
	if (fe) {
		e->creator = fe->creator;
		fe->flags |= AT_FORKF_SEEN | AT_FORKF_EXECED;
	}
	e->old_pid = args->old_pid;
	e->flags = 0;
	e->policy_id = 0;
	e->args_len = 0;
	/* the string read leaves the bytes after its NUL as the last exec on this CPU wrote them,
	 * and the whole buffer is kill_paths' key: a path after a longer one never matched */
	__builtin_memset(e->filename, 0, sizeof(e->filename));
	bpf_probe_read_kernel_str(e->filename, sizeof(e->filename),
				  (void *)args + (args->data_loc_filename & 0xFFFF));

	void *task = (void *)bpf_get_current_task();
	void *parent = 0, *mm = 0;
	bpf_probe_read_kernel(&parent, sizeof(parent), task + AT_OFF_TASK_REAL_PARENT);
	e->ppid = parent ? at_task_tgid(parent) : 0;

	/* argv: the new image's stack holds it between mm->arg_start and arg_end; the kernel has
	 * just written those pages, so the user read normally succeeds. A failure is flagged,
	 * never hidden (docs/ARCHITECTURE.md §4). */
	bpf_probe_read_kernel(&mm, sizeof(mm), task + AT_OFF_TASK_MM);
	if (mm) {
		unsigned long start = 0, end = 0;
		bpf_probe_read_kernel(&start, sizeof(start), mm + AT_OFF_MM_ARG_START);
		bpf_probe_read_kernel(&end, sizeof(end), mm + AT_OFF_MM_ARG_END);
		u64 len = end > start ? end - start : 0;
		if (len > AT_ARGS_MAX) {
			len = AT_ARGS_MAX;
			e->flags |= AT_EXEC_ARGS_TRUNCATED;
		}
		if (len > 0) {
			if (bpf_probe_read_user(e->args, (u32)len, (void *)start) == 0)
				e->args_len = len;
			else
				e->flags |= AT_EXEC_ARGS_READ_FAILED;
		}
	} else {
		e->flags |= AT_EXEC_ARGS_READ_FAILED;
	}

	/* Kernel-side kill: the exec is stopped before the new image runs a single instruction. */
	u32 *pid_kill = 0;
	u32 *paths_on = kill_paths_on.lookup(&zero);
	if (paths_on && *paths_on)
		pid_kill = kill_paths.lookup((struct at_path_key *)e->filename);
	if (!pid_kill)
		pid_kill = kill_names.lookup((struct at_name_key *)e->h.comm);
	if (pid_kill) {
		e->policy_id = *pid_kill;
		if (at_cfg(AT_CFG_ENFORCE)) {
			bpf_send_signal(9);
			e->flags |= AT_EXEC_KILLED;
		}
	} else if (at_tracer_dead(e->h.ktime) && at_cfg(AT_CFG_ENFORCE)) {
		/* Fail-closed (pinned, the tracer's heartbeat older than the grace): no one reads this
		 * record or judges the rules on its argv, so nothing new starts in an agent until a
		 * tracer is back; a root agent that kills its tracer gains no unjudged exec. */
		e->policy_id = AT_FAILCLOSED_POLICY;
		bpf_send_signal(9);
		e->flags |= AT_EXEC_KILLED;
	}

	int named = pid_kill || exec_watch.lookup((struct at_name_key *)e->h.comm);
	if (!at_admit_key(agent, named ? (agent | AT_POLICY_BUCKET) : agent, AT_EV_EXEC))
		return 0;
	u64 size = sizeof(struct at_exec) - AT_ARGS_MAX + e->args_len;
	if (size > sizeof(struct at_exec))
		size = sizeof(struct at_exec);
	e->h.size = size;
	if (events.ringbuf_output(e, size, at_wake_flags_at(e->h.ktime)) != 0)
		at_count_drop(agent, AT_EV_EXEC);
	else if (named && !(e->flags & AT_EXEC_KILLED))
		/* a rule names it and the kernel did not stop it: userspace may have to (a kill rule
		 * on its argv), so its record must not wait out the reader's batch gap */
		at_ring_doorbell();
	else if (!named && !at_system_path(e->filename))
		at_ring_doorbell_late();
	return 0;
}

/* A raw tracepoint (args: task, and group_dead where the kernel has it): its link can be pinned,
 * which escape's share of this hook needs, and the kernel builds no trace record for it. */
RAW_TRACEPOINT_PROBE(sched_process_exit)
{
	u64 cg, agent;
	u64 pt = bpf_get_current_pid_tgid();
	u32 tgid = pt >> 32;

#ifdef AT_HAVE_GROUP_DEAD
	/* the last thread of the process is leaving: that is the process exit */
	if (!ctx->args[1])
		return 0;
#else
	if ((u32)pt != tgid)
		return 0;
#endif
#ifdef AT_WITH_ESCAPE
	at_esc_exited(tgid);
#endif
	if (!at_scope(&cg, &agent))
		return 0;
	struct at_fork_entry *fe = proc_forks.lookup(&tgid);
	if (fe && (fe->flags & AT_FORKF_EXITED)) {
		/* this pid's entry is of an earlier process: this one was forked outside scope */
		proc_forks.delete(&tgid);
		fe = 0;
	}
	if (fe) {
		if (!(fe->flags & AT_FORKF_SEEN) && !at_cfg(AT_CFG_FORK_RECORDS)) {
			/* forked, never exec'd, never named by a record: userspace knows nothing of
			 * it, so its exit would be the only record of it. The entry stays (marked) so
			 * an orphaned descendant's exec still names it in its ancestry. */
			fe->flags |= AT_FORKF_EXITED;
			AT_COUNT_PROC(agent, exits_quiet);
			return 0;
		}
		if (fe->flags & AT_FORKF_EXECED) {
			proc_forks.delete(&tgid);
			AT_COUNT_PROC(agent, released);
		} else {
			/* seen without an exec: userspace may read its records (and the entry) after
			 * it is gone */
			fe->flags |= AT_FORKF_EXITED;
		}
	}
	if (!at_admit(agent, AT_EV_EXIT))
		return 0;
	struct at_exit *e = events.ringbuf_reserve(sizeof(struct at_exit));
	if (!e) {
		at_count_drop(agent, AT_EV_EXIT);
		return 0;
	}
	at_fill_header(&e->h, AT_EV_EXIT, sizeof(*e), cg, agent);
	void *task = (void *)bpf_get_current_task();
	void *leader = 0;
	e->exit_code = 0;
	e->pad = 0;
	e->start_ktime = 0;
	bpf_probe_read_kernel(&e->exit_code, sizeof(e->exit_code), task + AT_OFF_TASK_EXIT_CODE);
	bpf_probe_read_kernel(&leader, sizeof(leader), task + AT_OFF_TASK_GROUP_LEADER);
	if (leader)
		bpf_probe_read_kernel(&e->start_ktime, sizeof(e->start_ktime), leader + AT_OFF_TASK_START_TIME);
	events.ringbuf_submit(e, at_wake_flags_at(e->h.ktime));
	return 0;
}

/* SSH-related files: writes to authorized_keys, reads of private keys and host keys.
 *
 * Why these hooks: nothing but syscall tracepoints sees a path being opened on this kernel
 * family (no kprobes, LSM or fentry here; docs/ARCHITECTURE.md §4). They are the most expensive hook
 * agenttrace uses: while any syscalls:* tracepoint is attached, every task on the machine
 * takes the slow syscall path. So this feature is optional (probe feature `files`), and
 * the first thing every program does is the agent scope check: a task outside agent
 * cgroups pays the tracepoint entry plus that walk and nothing else.
 *
 * What is watched: openat, openat2 (flags from the user's struct open_how), and where the
 * architecture has them open and creat; the new name of rename, renameat, renameat2, link
 * and linkat (`mv tmp ~/.ssh/authorized_keys` is the usual way to plant a key). Each
 * syscall is compiled only when its tracepoint exists (AT_HAVE_SYS_* from the loader:
 * arm64 has no open/creat/rename/link).
 *
 * The path is read from user memory (bpf_probe_read_user_str). A read can fail on a page
 * not yet faulted in (it does for the first openat of every new process); openat retries
 * at sys_exit_openat, when the kernel has faulted the page in. A read that still fails
 * (or fails in another syscall) is never hidden: the event goes out with
 * AT_FILE_READ_FAILED and class unknown, and the failure is counted in file_stats.
 *
 * Only candidate paths reach userspace (classified below, the same rules as
 * tracer/decode/files.py classify()): basename authorized_keys / authorized_keys2; basename
 * ssh_host_*_key; basename identity or id_* (without a dot); or any path with a `.ssh`
 * directory component. A path relative to a directory inside ~/.ssh whose own text names
 * none of these (`cd ~/.ssh && cat mykey`) is not seen: the probe cannot resolve the
 * process's cwd without reading kernel-internal structs.
 *
 * Enforcement (mode enforce): file_policy maps (class << 8 | op) to a policy id; on a hit
 * the process gets SIGKILL at syscall entry. What that does, honestly:
 *  - open/openat/openat2/creat: the open itself still completes (O_CREAT creates the file,
 *    O_TRUNC empties it), then the process dies on the way back to user space, before it can
 *    read or write a single byte through the new descriptor.
 *  - rename/link: the syscall completes, so the new name IS in place when the process dies;
 *    the event says so (userspace reports kill_effect "name_in_place").
 */

#ifndef AT_FILE_POLICY_MAX
#define AT_FILE_POLICY_MAX 64
#endif

/* (class << 8 | op) -> policy id (the rule, see tracer/match/policy.py FileKill) */
BPF_HASH(file_policy, u32, u32, AT_FILE_POLICY_MAX);
/* [0] path reads that failed, [1] candidate events seen, [2] paths read late (at sys_exit)
 * (per CPU, summed by userspace) */
BPF_PERCPU_ARRAY(file_stats, u64, 3);
/* the record is 336 bytes: built in per-CPU scratch, not on the 512-byte stack */
BPF_PERCPU_ARRAY(file_scratch, struct at_file, 1);

#define AT_O_WRONLY 01
#define AT_O_RDWR   02
#define AT_O_CREAT  0100
#define AT_O_TRUNC  01000
#define AT_O_APPEND 02000
#define AT_O_WRITE_MASK (AT_O_WRONLY | AT_O_RDWR | AT_O_CREAT | AT_O_TRUNC | AT_O_APPEND)

/* Little-endian u64 of the first bytes of a name ("authoriz" ...), for comparing the first
 * 16 bytes of the basename collected in two registers. */
#define AT_LE_AUTHORIZ 0x7a69726f68747561ULL   /* "authoriz" */
#define AT_LE_ED_KEYS  0x7379656b5f6465ULL     /* "ed_keys" */
#define AT_LE_ED_KEYS2 0x327379656b5f6465ULL   /* "ed_keys2" */
#define AT_LE_IDENTITY 0x797469746e656469ULL   /* "identity" */
#define AT_LE_ID_      0x5f6469ULL             /* "id_" (3 bytes) */
#define AT_LE_SSH_HOST 0x74736f685f687373ULL   /* "ssh_host" */
#define AT_LE_KNOWN_HO 0x6f685f6e776f6e6bULL   /* "known_ho" */
#define AT_LE_STS      0x737473ULL             /* "sts" (3 bytes) */
#define AT_LE_CONFIG   0x6769666e6f63ULL       /* "config" */
#define AT_LE_ENVIRONM 0x6d6e6f7269766e65ULL   /* "environm" */
#define AT_LE_ENT      0x746e65ULL             /* "ent" */
#define AT_LE_RC       0x6372ULL               /* "rc" */
/* Big-endian tails from the rolling window (last byte lowest). */
#define AT_BE_KEY      0x5f6b6579ULL           /* "_key" */
#define AT_BE_PUB      0x2e707562ULL           /* ".pub" */
#define AT_BE_SSHDIR   0x2f2e7373682fULL       /* "/.ssh/" */

/* State of the classifying scan. It lives in per-CPU map memory, not in registers, on
 * purpose: values loaded from a map are unknown to the verifier, so every iteration of the
 * loop reaches the loop head in the same abstract state. Kept in registers, the component
 * length is a distinct known constant on each path and the verifier's state count grows
 * with the square of the path length (it refused the program: too complex). */
struct at_scan {
	u64 w;        /* rolling window of the last bytes (last byte lowest) */
	u64 b0, b1;   /* first 16 bytes of the current component, little-endian */
	u32 blen;     /* length of the current component */
	u32 dot;      /* the current component has a '.' */
	u32 in_ssh;   /* a `.ssh` directory component was seen */
	u32 pad;
};
BPF_PERCPU_ARRAY(file_scan, struct at_scan, 1);

/* One bounded pass over the path: is there a `.ssh/` directory component, and what is the
 * basename (first 16 bytes, length, whether it has a dot, last bytes)? Returns the
 * AT_FCLASS_* of a candidate, 0 for any other path. */
static __always_inline u32 at_file_classify(const char *p, u32 len)
{
	u32 zero = 0;
	/* volatile: clang must not keep these in registers across iterations (see above) */
	volatile struct at_scan *s = file_scan.lookup(&zero);
	if (!s)
		return 0;
	s->w = '/';        /* primed so that ".ssh/" at the very start counts as a component */
	s->b0 = s->b1 = 0;
	s->blen = s->dot = s->in_ssh = 0;

	for (u32 i = 0; i < AT_PATH_MAX; i++) {
		if (i >= len)
			break;
		u8 c = p[i & (AT_PATH_MAX - 1)];
		if (c == 0)
			break;
		u64 w = (s->w << 8) | c;
		s->w = w;
		if (c == '/') {
			if ((w & 0xffffffffffffULL) == AT_BE_SSHDIR)
				s->in_ssh = 1;
			s->b0 = 0;
			s->b1 = 0;
			s->blen = 0;
			s->dot = 0;
			continue;
		}
		if (c == '.')
			s->dot = 1;
		u32 bl = s->blen;
		if (bl < 8)
			s->b0 |= (u64)c << ((bl & 7) * 8);
		else if (bl < 16)
			s->b1 |= (u64)c << ((bl & 7) * 8);
		s->blen = bl + 1;
	}
	u64 b0 = s->b0, b1 = s->b1;
	u32 blen = s->blen, tail4 = (u32)s->w;
	if (blen == 15 && b0 == AT_LE_AUTHORIZ && b1 == AT_LE_ED_KEYS)
		return AT_FCLASS_AUTHORIZED_KEYS;
	if (blen == 16 && b0 == AT_LE_AUTHORIZ && b1 == AT_LE_ED_KEYS2)
		return AT_FCLASS_AUTHORIZED_KEYS;
	if (blen >= 13 && b0 == AT_LE_SSH_HOST && (b1 & 0xff) == '_' && tail4 == AT_BE_KEY)
		return AT_FCLASS_HOST_KEY;
	if (blen == 0)
		return 0;                    /* a directory path ("~/.ssh/"): nothing to classify */
	if (s->in_ssh) {
		/* everything in ~/.ssh is secret except these well-known public names */
		if (tail4 == AT_BE_PUB ||
		    (blen >= 11 && b0 == AT_LE_KNOWN_HO && (b1 & 0xffffff) == AT_LE_STS) ||
		    (blen >= 15 && b0 == AT_LE_AUTHORIZ && (b1 & 0xffffffffffffffULL) == AT_LE_ED_KEYS) ||
		    (blen == 6 && b0 == AT_LE_CONFIG) ||
		    (blen == 11 && b0 == AT_LE_ENVIRONM && b1 == AT_LE_ENT) ||
		    (blen == 2 && b0 == AT_LE_RC))
			return AT_FCLASS_SSH_OTHER;
		return AT_FCLASS_PRIVATE_KEY;
	}
	if ((blen == 8 && b0 == AT_LE_IDENTITY) || ((b0 & 0xffffff) == AT_LE_ID_ && !s->dot))
		return AT_FCLASS_PRIVATE_KEY;
	return 0;
}

/* A path that could not be read at sys_enter_openat, retried at sys_exit_openat: the
 * kernel has faulted the page in by then (getname copied it). Measured here: the first
 * openat of every freshly exec'd process (ld.so opening its cache, path in a read-only page
 * not yet touched) fails at entry and succeeds at exit. Keyed by pid_tgid; LRU so an entry
 * whose exit never came (the thread died in the syscall) cannot pin memory. */
struct at_file_retry {
	u64 upath;
	u32 flags;
	u32 op;
	s32 dfd;
	u16 sys;
	u16 pad;
};
BPF_TABLE("lru_hash", u64, struct at_file_retry, file_retry, 4096);

static __always_inline int at_file_event(u16 sys, s32 dfd, const char *upath, u32 flags, u32 op,
					 int can_retry, u16 late)
{
	u64 cg, agent;
	u32 zero = 0, one = 1;

	if (!at_scope(&cg, &agent))
		return 0;
	struct at_file *e = file_scratch.lookup(&zero);
	if (!e)
		return 0;
	e->fflags = late;
	e->policy_id = 0;
	int n = bpf_probe_read_user_str(e->path, sizeof(e->path), upath);
	u32 fclass;
	if (n <= 0 && can_retry) {
		u64 pt = bpf_get_current_pid_tgid();
		struct at_file_retry r = {};
		r.upath = (u64)upath;
		r.flags = flags;
		r.op = op;
		r.dfd = dfd;
		r.sys = sys;
		file_retry.update(&pt, &r);
		return 0;
	}
	if (n <= 0) {
		/* never hidden (docs/ARCHITECTURE.md §4): counted and reported with class unknown */
		e->path[0] = 0;
		e->path_len = 0;
		e->fflags |= AT_FILE_READ_FAILED;
		u64 *c = file_stats.lookup(&zero);
		if (c)
			(*c)++;
		fclass = AT_FCLASS_UNKNOWN;
	} else {
		e->path_len = n;
		if (n >= AT_PATH_MAX)
			e->fflags |= AT_FILE_PATH_TRUNCATED;
		fclass = at_file_classify(e->path, (u32)n);
		if (!fclass)
			return 0;            /* not an ssh file: nothing leaves the kernel */
	}
	u64 *seen = file_stats.lookup(&one);
	if (seen)
		(*seen)++;

	/* Kernel-side kill, decided before the rate limit (like exec kills). At sys_exit the
	 * open has completed either way; the process still dies before returning to user space. */
	u32 pkey = (fclass << 8) | op;
	u32 *pid = file_policy.lookup(&pkey);
	if (pid) {
		e->policy_id = *pid;
		if (at_cfg(AT_CFG_ENFORCE)) {
			bpf_send_signal(9);
			e->fflags |= AT_FILE_KILLED;
		}
	}
	if (!at_admit(agent, AT_EV_FILE))
		return 0;
	at_fill_header(&e->h, AT_EV_FILE, sizeof(*e), cg, agent);
	e->op = op;
	e->flags = flags;
	e->dfd = dfd;
	e->syscall = sys;
	e->fclass = fclass;
	if (events.ringbuf_output(e, sizeof(*e), at_wake_flags()) != 0)
		at_count_drop(agent, AT_EV_FILE);
	return 0;
}

static __always_inline u32 at_open_op(u64 flags)
{
	return (flags & AT_O_WRITE_MASK) ? AT_FILE_WRITE : AT_FILE_READ;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat)
{
	return at_file_event(AT_SYS_OPENAT, (s32)args->dfd, (const char *)args->filename,
			     (u32)args->flags, at_open_op(args->flags), 1, 0);
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat)
{
	/* outside agents this is one hash lookup that misses */
	u64 pt = bpf_get_current_pid_tgid();
	struct at_file_retry *r = file_retry.lookup(&pt);
	if (!r)
		return 0;
	struct at_file_retry c = *r;
	file_retry.delete(&pt);
	u64 *late = 0;
	u32 two = 2;
	late = file_stats.lookup(&two);
	if (late)
		(*late)++;
	return at_file_event(c.sys, c.dfd, (const char *)c.upath, c.flags, c.op, 0, AT_FILE_LATE_READ);
}

#ifdef AT_HAVE_SYS_OPENAT2
TRACEPOINT_PROBE(syscalls, sys_enter_openat2)
{
	u64 flags = 0;
	/* struct open_how { u64 flags; u64 mode; u64 resolve; } in user memory; a failed read
	 * leaves flags 0 (reported as a read) */
	bpf_probe_read_user(&flags, sizeof(flags), (void *)args->how);
	return at_file_event(AT_SYS_OPENAT2, (s32)args->dfd, (const char *)args->filename,
			     (u32)flags, at_open_op(flags), 0, 0);
}
#endif

#ifdef AT_HAVE_SYS_OPEN
TRACEPOINT_PROBE(syscalls, sys_enter_open)
{
	return at_file_event(AT_SYS_OPEN, -100, (const char *)args->filename,
			     (u32)args->flags, at_open_op(args->flags), 0, 0);
}
#endif

#ifdef AT_HAVE_SYS_CREAT
TRACEPOINT_PROBE(syscalls, sys_enter_creat)
{
	/* creat(path, mode) == open(path, O_CREAT|O_WRONLY|O_TRUNC, mode) */
	return at_file_event(AT_SYS_CREAT, -100, (const char *)args->pathname,
			     AT_O_CREAT | AT_O_WRONLY | AT_O_TRUNC, AT_FILE_WRITE, 0, 0);
}
#endif

/* rename/link: the new name is written (op WRITE). */
#ifdef AT_HAVE_SYS_RENAMEAT2
TRACEPOINT_PROBE(syscalls, sys_enter_renameat2)
{
	return at_file_event(AT_SYS_RENAMEAT2, (s32)args->newdfd, (const char *)args->newname, 0, AT_FILE_WRITE, 0, 0);
}
#endif

#ifdef AT_HAVE_SYS_RENAMEAT
TRACEPOINT_PROBE(syscalls, sys_enter_renameat)
{
	return at_file_event(AT_SYS_RENAMEAT, (s32)args->newdfd, (const char *)args->newname, 0, AT_FILE_WRITE, 0, 0);
}
#endif

#ifdef AT_HAVE_SYS_RENAME
TRACEPOINT_PROBE(syscalls, sys_enter_rename)
{
	return at_file_event(AT_SYS_RENAME, -100, (const char *)args->newname, 0, AT_FILE_WRITE, 0, 0);
}
#endif

#ifdef AT_HAVE_SYS_LINKAT
TRACEPOINT_PROBE(syscalls, sys_enter_linkat)
{
	return at_file_event(AT_SYS_LINKAT, (s32)args->newdfd, (const char *)args->newname, 0, AT_FILE_WRITE, 0, 0);
}
#endif

#ifdef AT_HAVE_SYS_LINK
TRACEPOINT_PROBE(syscalls, sys_enter_link)
{
	return at_file_event(AT_SYS_LINK, -100, (const char *)args->newname, 0, AT_FILE_WRITE, 0, 0);
}
#endif

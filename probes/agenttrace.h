/* agenttrace wire format: every struct the kernel writes to the ring buffer, and the
 * event-type enum. Mirrored by ctypes classes in tracer/kernel/wire.py; tests/test_wire.py
 * compiles this header and proves sizes and offsets match.
 *
 * Rules for editing: never renumber an event type; add fields only at the end of a body;
 * keep every struct free of implicit padding (explicit pad fields) so the layout is the same
 * for clang -target bpf and for the host compiler the test uses.
 */
#ifndef AGENTTRACE_H
#define AGENTTRACE_H

#ifndef __BCC__
#include <linux/types.h>
typedef __u8 u8; typedef __u16 u16; typedef __u32 u32; typedef __u64 u64; typedef __s32 s32;
#endif

#define AT_COMM_LEN 16

/* Indices of the one runtime-config map `at_config` (probes/common.h), written by one place in
 * userspace (tracer/session/pipeline.py Tracer.set_mode, GpuFence): every enforce switch together, so a
 * reload between monitor and enforce flips exec kills, file kills, connect blocks, protocol
 * drops and the GPU fence at once. Mirrored in tracer/kernel/wire.py; never renumber. */
#define AT_CFG_ENFORCE        0   /* 1: enforce mode (kernel verdicts deny); 0: report only */
#define AT_CFG_GPU_FENCE      1   /* 1: the GPU fence follows the mode; 0: it only reports */
#define AT_CFG_GPU_DEFAULT    2   /* GPU verdict for agents with no gpu_policy entry yet (1: deny) */
#define AT_CFG_DEFAULT_GROUP  3   /* egress group of agents with no agent_group entry yet (the config's
                                   * "default" group): a new agent cgroup is under its policy before
                                   * userspace has seen it */
#define AT_CFG_FORK_RECORDS   4   /* 1: send a fork record per new process (the old contract); 0: fork
                                   * records stay in the kernel (proc_forks), exec carries the creator */
#define AT_CFG__MAX           5
#define AT_PATH_MAX 256
#define AT_ARGS_MAX 4096     /* argv bytes kept per exec; longer argv is marked truncated */
#define AT_DNS_MAX 512       /* a DNS message over UDP fits in 512 bytes without EDNS */
#define AT_FLOW_BYTES 256    /* first payload bytes of a flow: enough for banners, ClientHello SNI, request lines */

enum at_event_type {
	AT_EV_EXEC = 1,
	AT_EV_FORK = 2,
	AT_EV_EXIT = 3,
	AT_EV_CONNECT = 4,      /* connect()/sendmsg() destination seen by the cgroup sock_addr hooks */
	AT_EV_CONN_RESULT = 5,  /* what became of a TCP connect: established / refused / error */
	AT_EV_LISTEN = 6,       /* listen() or an accepted inbound connection */
	AT_EV_DNS = 7,          /* a DNS message (query or answer) from/to an agent socket */
	AT_EV_FLOW = 8,         /* first payload bytes of a TCP flow, one direction */
	AT_EV_DEVICE = 9,       /* device access checked by the cgroup device hook */
	AT_EV_FILE = 10,        /* access to a watched sensitive file (ssh keys) */
	AT_EV_SOCKET = 11,      /* an agent created a fenced socket (raw IP, packet...): sock_create or packet.c */
	AT_EV_ESCAPE = 12,      /* an agent process was moved to a cgroup outside the watched subtree */
	AT_EV_SNI = 15,         /* a TLS ClientHello whose server name a rule forbids (probes/tls.c) */
	AT_EV__MAX = 16,
};

/* Header of every record. pid/tgid/uid/comm are the current task's when the event fired. */
struct at_header {
	u16 type;
	u16 size;            /* bytes of the whole record, header included */
	u32 pid;             /* kernel thread id */
	u32 tgid;            /* process id */
	u32 uid;
	u64 ktime;           /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	u64 cgroup_id;       /* the task's own cgroup v2 id (inode of its directory) */
	u64 agent_cgroup_id; /* the agent's cgroup: direct child of the watched cgroup, or the watched one */
	char comm[AT_COMM_LEN];
};

#define AT_EXEC_ARGS_TRUNCATED   0x1
#define AT_EXEC_ARGS_READ_FAILED 0x2
#define AT_EXEC_KILLED           0x4   /* the exec was killed in the kernel by policy */

struct at_exec {
	struct at_header h;
	u32 ppid;
	u32 old_pid;         /* the thread id that called exec (differs when a thread execs) */
	u32 flags;
	u32 args_len;        /* bytes valid in args: NUL-separated argv */
	u32 policy_id;       /* kill-policy entry that matched, 0 when none */
	u32 creator;         /* tgid that forked this process (proc_forks), 0 when unknown: use ppid */
	char filename[AT_PATH_MAX];  /* kernel copy of the exec path (sched_process_exec) */
	char args[AT_ARGS_MAX];      /* variable length on the wire: only args_len bytes are sent */
};

struct at_fork {
	struct at_header h;  /* the parent */
	u32 child_tgid;
	u32 parent_tgid;
};

struct at_exit {
	struct at_header h;
	s32 exit_code;       /* raw wait status: (code << 8) | signal */
	u32 pad;
	u64 start_ktime;     /* task start, CLOCK_MONOTONIC, for duration */
};

/* proc_forks (probes/common.h): tgid -> who forked it and when, for processes forked inside
 * watched cgroups. It is the creator chain the fork records used to carry to userspace. */
#define AT_FORKF_SEEN    0x1  /* a record named it (or a descendant's exec): its exit is reported */
#define AT_FORKF_EXECED  0x2  /* it exec'd: userspace knows it from the exec record */
#define AT_FORKF_EXITED  0x4  /* it exited unseen; kept so a later exec can still name it as an ancestor */

struct at_fork_entry {
	u32 creator;         /* tgid of the forking process (survives reparenting) */
	u32 flags;           /* AT_FORKF_* */
	u64 ktime;           /* the fork, CLOCK_MONOTONIC: the fork record's ktime, so the same exec_id */
};

/* Per-agent process counts (map proc_counts, per CPU); key 0 holds the totals of all agents. */
struct at_proc_count {
	u64 forks;           /* new processes forked in scope, whether or not a fork record went out */
	u64 forks_quiet;     /* of them, fork records not sent (AT_CFG_FORK_RECORDS off) */
	u64 exits_quiet;     /* exit records not sent: forked with fork records off, exited unseen */
	u64 released;        /* proc_forks entries deleted at exit (the rest age out of the LRU) */
};

#define AT_OP_CONNECT 0
#define AT_OP_SENDMSG 1
#define AT_OP_ICMP    2      /* an ICMP echo request (probes/egress.c), port 0 */

#define AT_VERDICT_ALLOWED 0
#define AT_VERDICT_BLOCKED 1

struct at_connect {
	struct at_header h;
	u64 cookie;          /* bpf_get_socket_cookie: ties connect, result, flow and dns records */
	u64 sk;              /* kernel socket address, used only as an id to match the result */
	u16 family;          /* AF_INET / AF_INET6 */
	u16 protocol;        /* IPPROTO_TCP / IPPROTO_UDP */
	u16 dport;           /* host byte order */
	u8 op;               /* AT_OP_* */
	u8 verdict;          /* AT_VERDICT_* */
	u8 daddr[16];        /* IPv4 in the first 4 bytes */
	u32 policy_id;       /* deny entry that blocked it, 0 when none */
	u32 pad;
};

#define AT_RESULT_ESTABLISHED 1
#define AT_RESULT_REFUSED     2
#define AT_RESULT_ERROR       3

struct at_conn_result {
	struct at_header h;
	u64 sk;
	u16 family;
	u16 sport;
	u16 dport;
	u16 result;          /* AT_RESULT_* */
	s32 error;           /* errno reported by the socket, 0 when established */
	u32 pad;
	u8 saddr[16];
	u8 daddr[16];
};

#define AT_LISTEN_LISTEN 1
#define AT_LISTEN_ACCEPT 2

struct at_listen {
	struct at_header h;
	u64 cookie;
	u16 family;
	u16 protocol;
	u16 lport;
	u16 rport;           /* peer port of an accepted connection */
	u8 what;             /* AT_LISTEN_* */
	u8 pad[7];
	u8 laddr[16];
	u8 raddr[16];
};

#define AT_DIR_EGRESS  0
#define AT_DIR_INGRESS 1

struct at_dns {
	struct at_header h;
	u64 cookie;
	u16 family;
	u16 protocol;
	u16 sport;
	u16 dport;
	u8 direction;        /* AT_DIR_* */
	u8 pad;
	u16 len;             /* bytes valid in msg */
	u32 pad2;
	u8 saddr[16];
	u8 daddr[16];
	u8 msg[AT_DNS_MAX];
};

struct at_flow {
	struct at_header h;
	u64 cookie;
	u16 family;
	u16 sport;
	u16 dport;
	u8 direction;        /* AT_DIR_* */
	u8 verdict;          /* AT_VERDICT_*: blocked when the handshake packet was dropped */
	u32 len;             /* bytes valid in data */
	u32 proto_hint;      /* kernel classification, see AT_PROTO_* */
	u8 saddr[16];
	u8 daddr[16];
	u8 data[AT_FLOW_BYTES];
	u32 skipped;         /* leading whitespace bytes before data that were not captured (padding) */
	u16 segs;            /* TCP segments the capture was reassembled from */
	u16 fflags;          /* AT_FLOWF_* */
};

/* at_flow.fflags: how the capture was taken */
#define AT_FLOWF_REASSEMBLED 0x1   /* data spans more than one segment */
#define AT_FLOWF_PADDED      0x2   /* leading whitespace was skipped (see skipped) */
#define AT_FLOWF_PAD_LIMIT   0x4   /* the whitespace skip hit its limit: data may still be padding */
#define AT_FLOWF_FLUSHED     0x8   /* sent undecided: this way ended (FIN/RST), a hole, or (interim copy) the peer spoke */
#define AT_FLOWF_GAP         0x10  /* a segment arrived ahead of a missing one and was not captured */
#define AT_FLOWF_LOST        0x20  /* the reassembly entry was evicted: data restarts mid-stream */
#define AT_FLOWF_PREBANNER   0x40  /* an SSH banner was found after other lines */

#define AT_PROTO_UNKNOWN 0
#define AT_PROTO_SSH     1
#define AT_PROTO_STRATUM 2
#define AT_PROTO_TLS     3
#define AT_PROTO_HTTP    4

struct at_device {
	struct at_header h;
	u32 major;
	u32 minor;
	u32 access;          /* BPF_DEVCG_ACC_* bits */
	u16 dev_type;        /* BPF_DEVCG_DEV_* */
	u8 verdict;          /* AT_VERDICT_* */
	u8 pad;
};

#define AT_FILE_READ  1
#define AT_FILE_WRITE 2

/* which syscall the path came from (at_file.syscall) */
#define AT_SYS_OPENAT    1
#define AT_SYS_OPENAT2   2
#define AT_SYS_OPEN      3
#define AT_SYS_CREAT     4
#define AT_SYS_RENAMEAT2 5
#define AT_SYS_RENAMEAT  6
#define AT_SYS_RENAME    7
#define AT_SYS_LINKAT    8
#define AT_SYS_LINK      9

/* the kernel's classification of the path (at_file.fclass); userspace applies the same rules */
#define AT_FCLASS_UNKNOWN         0  /* the path could not be read */
#define AT_FCLASS_AUTHORIZED_KEYS 1
#define AT_FCLASS_PRIVATE_KEY     2
#define AT_FCLASS_HOST_KEY        3
#define AT_FCLASS_SSH_OTHER       4

/* at_file.fflags */
#define AT_FILE_KILLED         0x1  /* the process was sent SIGKILL at syscall entry by policy */
#define AT_FILE_READ_FAILED    0x2  /* the path could not be read from user memory */
#define AT_FILE_PATH_TRUNCATED 0x4  /* the path filled AT_PATH_MAX bytes */
#define AT_FILE_LATE_READ      0x8  /* read at syscall exit: at entry the page was not faulted in */

struct at_file {
	struct at_header h;
	u32 op;              /* AT_FILE_* */
	u32 flags;           /* open flags (O_*); 0 for rename/link */
	char path[AT_PATH_MAX];  /* as the process passed it: may be relative to dfd */
	s32 dfd;             /* directory fd a relative path starts from; -100 (AT_FDCWD) = cwd */
	u32 policy_id;       /* file kill-policy entry that matched, 0 when none */
	u16 syscall;         /* AT_SYS_* */
	u16 path_len;        /* bytes read including the NUL; 0 when the read failed */
	u16 fclass;          /* AT_FCLASS_* */
	u16 fflags;          /* AT_FILE_KILLED | AT_FILE_READ_FAILED | AT_FILE_PATH_TRUNCATED */
};

#define AT_SOCK_DENY   1     /* at_socket.action: fenced (EPERM in enforce mode) */
#define AT_SOCK_REPORT 2     /* only reported */

struct at_socket {
	struct at_header h;
	u16 family;          /* AF_* */
	u16 type;            /* SOCK_* */
	u16 protocol;        /* IPPROTO_* */
	u8 verdict;          /* AT_VERDICT_*: blocked = socket() failed (EPERM) */
	u8 action;           /* AT_SOCK_* of the fence entry that matched */
	u32 policy_id;
	u16 flags;           /* AT_SOCK_F_* */
	u16 error;           /* AT_SOCK_F_SYSCALL: errno socket() returned, 0 when it succeeded */
};
#define AT_SOCK_F_SYSCALL 0x1 /* seen by the socket() syscall tracepoints (packet.c), not sock_create */
#define AT_SOCK_F_KILLED  0x2 /* enforce: the socket was made and the process got SIGKILL */

#define AT_ESC_SELF      0x1 /* the process moved itself (else: `writer` moved it) */
#define AT_ESC_KILLED    0x2 /* killed in the kernel (enforce mode) before it ran again */
#define AT_ESC_WRITER_IN 0x4 /* the writer is inside the watched subtree */
#define AT_ESC_AT_EXEC   0x8 /* found at exec: it was outside already (clone3 CLONE_INTO_CGROUP) */
#define AT_ESC_AT_FORK   0x10 /* born in another cgroup than its parent's (clone3 CLONE_INTO_CGROUP):
                               * dst_cgroup_id is the child's, dst_path empty; userspace judges it */

struct at_escape {
	struct at_header h;  /* the writer (current); agent_cgroup_id: the agent the process left */
	u64 dst_cgroup_id;
	u32 moved_tgid;
	u32 writer_tgid;
	s32 dst_level;
	u32 flags;           /* AT_ESC_* */
	char dst_path[AT_PATH_MAX];   /* relative to the cgroup2 root; empty when unknown */
};

#define AT_SNI_MAX 256       /* bytes of at_sni.name (a power of two: the probe masks with it) */
#define AT_SNI_NAME_MAX 253  /* longest host name checked; longer ones pass to userspace */
#define AT_SNI_MATCH_EXACT 1       /* at_sni.match: the whole name is listed */
#define AT_SNI_MATCH_SUBDOMAINS 2  /* at_sni.match: a `*.suffix` entry covers it */

/* A ClientHello's server name that a `block` rule forbids (probes/tls.c). In enforce mode the
 * segment was dropped (verdict blocked) and the flow with it; in monitor mode this goes out only
 * when the name lies past the flow record's capture. Decoded as a `flow` record. */
struct at_sni {
	struct at_header h;  /* the socket's owner (flow.c's record of it) where known */
	u64 cookie;
	u16 family;
	u16 sport;
	u16 dport;
	u8 verdict;          /* AT_VERDICT_* */
	u8 match;            /* AT_SNI_MATCH_* */
	u32 policy_id;       /* sni_deny entry that matched */
	u16 name_len;        /* bytes valid in name */
	u16 name_off;        /* where the name starts in the segment's TCP payload */
	u8 saddr[16];
	u8 daddr[16];
	char name[AT_SNI_MAX];
};

/* Key of the per-agent drop counters (map `drops`): ring-buffer reserve failures. */
struct at_drop_key {
	u64 agent_cgroup_id;
	u32 type;
	u32 pad;
};

#endif /* AGENTTRACE_H */

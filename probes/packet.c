/* Socket fencing for the families cgroup/sock_create never sees (packet, netlink, vsock, ...).
 *
 * Why syscalls:sys_enter_socket / sys_exit_socket: on this kernel nothing else runs when a
 * packet socket is made (no kprobes, LSM or fentry; sock_create is called from inet_create
 * only). The family, type and protocol are the tracepoint's arguments. The cost: with any
 * syscalls:* tracepoint attached every task on the machine takes the slow syscall path
 * (DESIGN §3, the same price `files` pays), so this is the optional feature `packet`; see
 * the README for the measured cost.
 *
 * The fence is the same `sock_fence` map (sock.c): one configuration, two hooks. inet and
 * inet6 sockets are sock.c's; they are stashed here too, and sock.c takes the stash away
 * when it sees the socket, so what is left at sys_exit is a raw inet socket that failed
 * before sock_create ran (no CAP_NET_RAW) -- reported as blocked with its errno.
 *
 * The verdict is taken at sys_exit, from the return value: a socket() that failed anyway
 * (EPERM for lack of CAP_NET_RAW, EAFNOSUPPORT) is `blocked` with its errno and nobody is
 * killed; one that succeeded is, in enforce mode, answered with SIGKILL: the socket exists
 * but the process dies on the way back to user space, before it can use the descriptor
 * (verdict `killed`, never `blocked`). Monitor mode only reports.
 *
 * What evades these tracepoints: compat syscalls (socket() or socketcall through int 0x80 --
 * from a 32-bit binary or a 64-bit one; the kernel leaves compat syscalls out of syscall
 * tracepoints: tested in tests/test_packet_fence.py) and io_uring's IORING_OP_SOCKET never
 * pass sys_enter_socket. For `run -- CMD` the dropped
 * CAP_NET_RAW closes those paths for packet (and raw IP) sockets in the kernel itself. */

#define AT_AF_INET  2
#define AT_AF_INET6 10
#define AT_SOCK_TYPE_MASK 0xf

TRACEPOINT_PROBE(syscalls, sys_enter_socket)
{
	/* the family test first: the fence is empty for almost every socket() and this costs
	 * less than the cgroup walk */
	u32 family = (u32)args->family;
	if (family == 0 || family > 0xffff)
		return 0;
	struct at_fence_key k = {};
	k.family = family;
	k.type = (u32)args->type & AT_SOCK_TYPE_MASK;
	k.protocol = (u16)args->protocol;
	struct at_fence_val *v = at_fence_find(&k);
	if (!v)
		return 0;
	u64 cg = 0, agent = 0;
	if (!at_scope(&cg, &agent))
		return 0;
	struct at_sock_pending p = {};
	p.cg = cg;
	p.agent = agent;
	p.policy_id = v->policy_id;
	p.family = family;
	p.type = (u32)args->type & AT_SOCK_TYPE_MASK;
	p.protocol = (u16)args->protocol;
	p.action = v->action;
	u64 tid = bpf_get_current_pid_tgid();
	sock_pending.update(&tid, &p);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_socket)
{
	u64 tid = bpf_get_current_pid_tgid();
	struct at_sock_pending *pp = sock_pending.lookup(&tid);
	if (!pp)
		return 0;
	struct at_sock_pending p = *pp;
	sock_pending.delete(&tid);
	long ret = args->ret;
	if (ret >= 0 && (p.family == AT_AF_INET || p.family == AT_AF_INET6))
		return 0;     /* made without sock_create seeing it: not fenced (sock.c decides inet) */
	u8 verdict = AT_VERDICT_ALLOWED;
	u16 flags = AT_SOCK_F_SYSCALL;
	if (ret < 0) {
		verdict = AT_VERDICT_BLOCKED;
	} else if (p.action == AT_SOCK_DENY && at_cfg(AT_CFG_ENFORCE)) {
		/* decided before the rate limit, like exec and file kills */
		bpf_send_signal(9);
		flags |= AT_SOCK_F_KILLED;
	}
	if (!at_admit(p.agent, AT_EV_SOCKET))
		return 0;
	struct at_socket *e = events.ringbuf_reserve(sizeof(struct at_socket));
	if (!e) {
		at_count_drop(p.agent, AT_EV_SOCKET);
		return 0;
	}
	at_fill_header(&e->h, AT_EV_SOCKET, sizeof(*e), p.cg, p.agent);
	e->family = p.family;
	e->type = p.type;
	e->protocol = p.protocol;
	e->verdict = verdict;
	e->action = p.action;
	e->policy_id = p.policy_id;
	e->flags = flags;
	e->error = ret < 0 ? (u16)(-ret) : 0;
	events.ringbuf_submit(e, at_wake_flags());
	return 0;
}

/* Socket fencing: what kinds of socket an agent may create.
 *
 * Why cgroup/sock_create: it runs inside socket() for sockets of the hooked cgroups only and
 * its verdict is the syscall's (0 = EPERM). Measured on this project's kernel (6.18): the
 * hook sees AF_INET and AF_INET6 sockets (raw, stream, datagram) and nothing else -- packet,
 * netlink, unix, vsock and XDP sockets never reach it. Those are fenced by packet.c (optional
 * feature `packet`, the socket() syscall tracepoints) from the same map, and for `run -- CMD`
 * in enforce mode by the agent losing CAP_NET_RAW (tracer/session/capdrop.py).
 *
 * `sock_fence` (tracer/kernel/sockfence.py) is keyed by (family, type, protocol) with 0xffff as "any"
 * for type or protocol; lookups go from the most to the least specific. Only sockets an entry
 * names are reported: ordinary TCP/UDP sockets cost three hash lookups and no record. */

#define AT_SOCK_ANY 0xffff

struct at_fence_key { u16 family; u16 type; u16 protocol; u16 pad; };
struct at_fence_val { u32 policy_id; u8 action; u8 pad[3]; };
BPF_HASH(sock_fence, struct at_fence_key, struct at_fence_val, 256);

#ifdef AT_WITH_PACKET
/* socket() calls of agents that matched a fence entry, from sys_enter_socket to sys_exit_socket
 * (packet.c), by thread. Declared here because this hook takes inet ones over: a raw inet
 * socket that reaches cgroup/sock_create is reported by it, so packet.c reports only those
 * that failed before it (no CAP_NET_RAW: `run -- CMD` in enforce mode drops it). */
struct at_sock_pending { u64 cg; u64 agent; u32 policy_id; u16 family; u16 type; u16 protocol; u8 action; u8 pad; };
/* LRU: an entry whose sys_exit never came (a thread that died inside socket()) ages out */
BPF_TABLE("lru_hash", u64, struct at_sock_pending, sock_pending, 4096);
#endif

/* The entry for a socket, from the most to the least specific: (family, type, protocol),
 * then any protocol, then any type. Shared with packet.c, which looks up the same fence. */
static __always_inline struct at_fence_val *at_fence_find(struct at_fence_key *k)
{
	struct at_fence_val *v = sock_fence.lookup(k);
	if (!v) {
		k->protocol = AT_SOCK_ANY;
		v = sock_fence.lookup(k);
	}
	if (!v) {
		k->type = AT_SOCK_ANY;
		v = sock_fence.lookup(k);
	}
	return v;
}

int at_sock_create(struct bpf_sock *sk)
{
	struct at_fence_key k = {};
	k.family = sk->family;
	k.type = sk->type;
	k.protocol = sk->protocol;
	struct at_fence_val *v = at_fence_find(&k);
	if (!v)
		return 1;
#ifdef AT_WITH_PACKET
	u64 tid = bpf_get_current_pid_tgid();
	sock_pending.delete(&tid);
#endif
	u8 verdict = v->action == AT_SOCK_DENY && at_cfg(AT_CFG_ENFORCE) ? AT_VERDICT_BLOCKED : AT_VERDICT_ALLOWED;
	u64 cg = bpf_get_current_cgroup_id(), agent = cg;
	at_scope(&cg, &agent);
	if (!at_admit(agent, AT_EV_SOCKET))
		return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
	struct at_socket *e = events.ringbuf_reserve(sizeof(struct at_socket));
	if (!e) {
		at_count_drop(agent, AT_EV_SOCKET);
		return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
	}
	at_fill_header(&e->h, AT_EV_SOCKET, sizeof(*e), cg, agent);
	e->family = sk->family;
	e->type = sk->type;
	e->protocol = sk->protocol;
	e->verdict = verdict;
	e->action = v->action;
	e->policy_id = v->policy_id;
	e->flags = 0;
	e->error = 0;
	events.ringbuf_submit(e, at_wake_flags());
	return verdict == AT_VERDICT_BLOCKED ? 0 : 1;
}

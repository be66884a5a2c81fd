/* GPU device fence: every open (and mknod) of an NVIDIA device node by an agent is reported,
 * and denied in enforce mode when the agent's group is not allowed GPUs.
 *
 * Why the cgroup device hook: the kernel asks it on every device-node access check of a
 * task in the cgroup (open, mknod), whatever path or bind mount the node was reached by,
 * so a copied /dev/nvidia0 made with mknod in a sandbox is fenced too; returning 0 makes
 * open() fail with EPERM. It is attached with BPF_F_ALLOW_MULTI on the watched cgroup, so it
 * runs for every descendant and costs nothing for the rest of the node.
 *
 * Cost: NVIDIA majors are known up front; anything else returns 1 after two compares and,
 * for unusual majors, one hash lookup, without touching the ring buffer. */

#ifndef AT_NVIDIA_MAJOR
#define AT_NVIDIA_MAJOR 195      /* /dev/nvidia[0-9]*, /dev/nvidiactl, /dev/nvidia-modeset */
#endif
#ifndef AT_NVIDIA_UVM_MAJOR
#define AT_NVIDIA_UVM_MAJOR 0    /* dynamic; the loader reads it from /proc/devices (0: not loaded) */
#endif

/* More char majors that count as GPU devices (nvidia-caps, a uvm major that appeared after
 * load, ...): major -> 1. */
BPF_HASH(gpu_dev_majors, u32, u32, 64);
/* Agent cgroup id -> 1 deny GPUs, 0 allow. */
BPF_HASH(gpu_policy, u64, u32, AT_MAX_WATCHED * 16);
/* The fence denies only when at_config says enforce AND gpu-fence-follows-mode; agents with
 * no gpu_policy entry yet get AT_CFG_GPU_DEFAULT, so an agent cgroup made a moment ago is
 * fenced from its first open, before userspace has seen it. */

int at_device_check(struct bpf_cgroup_dev_ctx *ctx)
{
	u32 dev_type = ctx->access_type & 0xFFFF;
	u32 major = ctx->major;

	if (dev_type != BPF_DEVCG_DEV_CHAR)
		return 1;
	if (major != AT_NVIDIA_MAJOR && (AT_NVIDIA_UVM_MAJOR == 0 || major != AT_NVIDIA_UVM_MAJOR) &&
	    !gpu_dev_majors.lookup(&major))
		return 1;

	u64 cg = 0, agent = 0;
	if (!at_scope(&cg, &agent))
		return 1;  /* attached only to watched subtrees; a miss means the map is being edited */

	u32 *pol = gpu_policy.lookup(&agent);
	u32 deny = pol ? *pol : at_cfg(AT_CFG_GPU_DEFAULT);
	int blocked = deny && at_cfg(AT_CFG_ENFORCE) && at_cfg(AT_CFG_GPU_FENCE);

	struct at_device *e = events.ringbuf_reserve(sizeof(struct at_device));
	if (!e) {
		at_count_drop(agent, AT_EV_DEVICE);
		return blocked ? 0 : 1;
	}
	at_fill_header(&e->h, AT_EV_DEVICE, sizeof(struct at_device), cg, agent);
	e->major = major;
	e->minor = ctx->minor;
	e->access = ctx->access_type >> 16;
	e->dev_type = (u16)dev_type;
	e->verdict = blocked ? AT_VERDICT_BLOCKED : AT_VERDICT_ALLOWED;
	e->pad = 0;
	events.ringbuf_submit(e, at_wake_flags());
	return blocked ? 0 : 1;
}

"""What one step of a probe costs, hot in cache (issue #15, probes/proc.c).

Each BPF program repeats one step (a helper, a map operation, a ring-buffer write) N times in a
bounded loop and runs once through BPF_PROG_TEST_RUN (raw tracepoint) in this task's context; the
run's wall time over N, less the empty loop's, is the step's cost (best of 5). These are lower
bounds: in an exec storm the same steps run on cold caches, several times slower.

    .venv/bin/python bench/profiles/bpf_steps.py        (root; BCC from Debian)
"""
import ctypes as C
import struct
import time

from bcc import BPF

N = 2000
SRC = r'''
struct fe { u32 creator; u32 flags; u64 ktime; };
struct big { char b[256]; };
BPF_TABLE("lru_hash", u32, struct fe, lru, 65536);
BPF_HASH(plain, u32, u64, 65536);
BPF_HASH(small, u64, u32, 1024);
BPF_HASH(bigkey, struct big, u32, 1024);
BPF_TABLE("lru_percpu_hash", u64, struct fe, pcpu, 4096);
BPF_PERCPU_ARRAY(scratch, struct big, 1);
BPF_RINGBUF_OUTPUT(rb, 4096);

'''
# one step each: BCC rewrites map calls only outside macros, so the C is generated
STEP_BODIES = {
    'empty': '',
    'ktime': 'x += bpf_ktime_get_ns()',
    'comm': 'char c[16]; bpf_get_current_comm(c, 16)',
    'ancestor_cgroup': 'x += bpf_get_current_ancestor_cgroup_id(1)',
    'probe_read': 'u64 v = 0; bpf_probe_read_kernel(&v, 8, (void *)bpf_get_current_task() + 16)',
    'hash_lookup_u64': 'u64 k = i & 7; small.lookup(&k)',
    'hash_lookup_256B_key': 'u32 z = 0; struct big *b = scratch.lookup(&z); if (b) bigkey.lookup(b)',
    'lru_update_new': 'u32 k = 1000000 + i; struct fe v = {}; lru.update(&k, &v)',
    'lru_lookup_hit': 'u32 k = 1000000 + i; lru.lookup(&k)',
    'lru_lookup_miss': 'u32 k = 3000000 + i; lru.lookup(&k)',
    'lru_delete_hit': 'u32 k = 1000000 + i; lru.delete(&k)',
    'lru_delete_miss': 'u32 k = 3000000 + i; lru.delete(&k)',
    'hash_update_new': 'u32 k = 1000000 + i; u64 v = 1; plain.update(&k, &v)',
    'hash_delete_hit': 'u32 k = 1000000 + i; plain.delete(&k)',
    'percpu_lru_lookup_or_init': 'u64 k = 5; struct fe z = {}; struct fe *v = pcpu.lookup_or_try_init(&k, &z); if (v) v->flags++',
    'ringbuf_reserve_submit_64B': 'u64 *e = rb.ringbuf_reserve(64); if (e) { e[0] = i; rb.ringbuf_submit(e, BPF_RB_NO_WAKEUP); }',
    'ringbuf_output_200B': 'u32 z = 0; struct big *b = scratch.lookup(&z); if (b) rb.ringbuf_output(b, 200, BPF_RB_NO_WAKEUP)',
}
LOOP = """
static __always_inline void body_{name}(u32 i, u64 *xp) {{ u64 x = 0; {body}; *xp += x; }}
int step_{name}(struct bpf_raw_tracepoint_args *ctx)
{{
	u64 x = 0;
	#pragma nounroll
	for (u32 i = 0; i < NLOOP; i++)
		body_{name}(i, &x);
	return x == 12345;
}}
"""
STEPS = ["empty", "ktime", "comm", "ancestor_cgroup", "probe_read", "hash_lookup_u64",
         "hash_lookup_256B_key", "lru_update_new", "lru_lookup_hit", "lru_lookup_miss",
         "lru_delete_hit", "lru_delete_miss", "hash_update_new", "hash_delete_hit",
         "percpu_lru_lookup_or_init", "ringbuf_reserve_submit_64B", "ringbuf_output_200B"]
# steps whose keys must be present first (deletes of what an update inserted)
REFILL = {"lru_delete_hit": "lru_update_new", "hash_delete_hit": "hash_update_new"}

_libc = C.CDLL(None, use_errno=True)


def test_run(fd: int) -> None:
    args = (C.c_uint64 * 6)()
    attr = C.create_string_buffer(80)
    # union bpf_attr, .test: prog_fd, retval, data sizes and pointers, repeat, duration, ctx
    struct.pack_into("IIIIQQIIIIQQ", attr, 0, fd, 0, 0, 0, 0, 0, 0, 0, C.sizeof(args), 0,
                     C.addressof(args), 0)
    if _libc.syscall(321, 10, attr, 80) != 0:      # bpf(BPF_PROG_TEST_RUN)
        raise OSError(C.get_errno(), "BPF_PROG_TEST_RUN")


def main() -> None:
    text = SRC + "".join(LOOP.format(name=n, body=STEP_BODIES[n]) for n in STEPS)
    b = BPF(text=text, cflags=[f"-DNLOOP={N}", "-w"])
    fds = {n: b.load_func(f"step_{n}".encode(), BPF.RAW_TRACEPOINT).fd for n in STEPS}
    b["rb"].open_ring_buffer(lambda *a: 0)
    best: dict[str, float] = {}
    for _ in range(5):
        for n in STEPS:
            if n in REFILL:
                test_run(fds[REFILL[n]])
            t0 = time.perf_counter_ns()
            test_run(fds[n])
            best[n] = min(best.get(n, float("inf")), (time.perf_counter_ns() - t0) / N)
            b.ring_buffer_consume()
    for n in STEPS[1:]:
        print(f"{n:28s} {best[n] - best['empty']:7.1f} ns")


if __name__ == "__main__":
    main()

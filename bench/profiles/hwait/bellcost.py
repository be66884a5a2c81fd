# Scratch measurement tool of bench/profiles/hwait-batching.md (issue 15); not shipped, not a test.
"""What a doorbell ring costs a probe when the bell is already rung (the common case in a
storm: one ring per read), against a plain hash lookup: bpf_steps.py's method (a bounded loop
run once through BPF_PROG_TEST_RUN, best of 5, less the empty loop)."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bcc import BPF                      # noqa: E402
from bpf_steps import LOOP, test_run     # noqa: E402

N = 2000
SRC = r'''
BPF_RINGBUF_OUTPUT(bell, 1);
BPF_HASH(small, u64, u32, 1024);
'''
BODIES = {
    "empty": "",
    "hash_lookup_u64": "u64 k = i & 7; small.lookup(&k)",
    # the first iteration rings it; every later one finds it full (nobody reads it here)
    "bell_already_rung": "u64 *b = bell.ringbuf_reserve(2040); if (b) { *b = 1; bell.ringbuf_submit(b, BPF_RB_NO_WAKEUP); }",
}
b = BPF(text=SRC + "".join(LOOP.format(name=n, body=v) for n, v in BODIES.items()), cflags=[f"-DNLOOP={N}", "-w"])
fds = {n: b.load_func(f"step_{n}".encode(), BPF.RAW_TRACEPOINT).fd for n in BODIES}
best = {}
for _ in range(5):
    for n, fd in fds.items():
        t0 = time.perf_counter_ns()
        test_run(fd)
        best[n] = min(best.get(n, float("inf")), (time.perf_counter_ns() - t0) / N)
for n in list(BODIES)[1:]:
    print(f"{n:20s} {best[n] - best['empty']:7.1f} ns")

# Scratch measurement tool of bench/profiles/hrate2.md (issue 15); not shipped, not a test.
"""Share of a tracer's on-CPU samples (perf script output, -g) whose stack holds each marker."""
import sys, collections
txt = [s for s in open(sys.argv[1]).read().split("\n\n") if s.strip()]
tot = len(txt); c = collections.Counter(); leaf = collections.Counter()
marks = ("orjson", "ksys_write", "pipe_write", "ksys_read", "asm_exc_page_fault", "__x64_sys_openat", "__x64_sys_bpf", "epoll_wait", "__x64_sys_kill", "__x64_sys_readlink", "getdents64", "newfstatat", "statx", "[kernel.kallsyms]")
for s in txt:
    lines = s.split("\n")
    for m in marks:
        if m in s: c[m] += 1
    if len(lines) > 1: leaf[lines[1].split()[-1]] += 1
print(f"samples {tot}")
for m in marks: print(f"  {m:22s} {c[m]:5d} {100 * c[m] / tot:5.1f}%  (stack holds it)")
print("by leaf object:"); [print(f"  {k:50s} {v:5d} {100 * v / tot:5.1f}%") for k, v in leaf.most_common(8)]

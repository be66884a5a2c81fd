# Scratch measurement tool of bench/profiles/hrate2.md (issue 15); not shipped, not a test.
"""Self and inclusive shares of a py-spy raw profile."""
import sys, collections
tot = 0; selfc = collections.Counter(); incl = collections.Counter()
for line in open(sys.argv[1]):
    line = line.rstrip()
    if not line: continue
    stack, _, n = line.rpartition(' ')
    n = int(n); frames = stack.split(';')
    tot += n; selfc[frames[-1]] += n
    for f in set(frames): incl[f] += n
print("samples", tot)
print("SELF:"); [print(f"  {100*v/tot:5.1f}% {k[:120]}") for k, v in selfc.most_common(25)]
print("INCLUSIVE, sink path:")
for k, v in incl.most_common(2000):
    if any(x in k for x in ("emit_batch", "render_lines", "orjson", "write", "_flush ", "Fanout", "QueuedSink")):
        print(f"  {100*v/tot:5.1f}% {k[:120]}")

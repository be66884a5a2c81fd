# Scratch measurement tool of bench/profiles/hexec-live-gap.md (issue 15); not shipped, not a test.
"""Two builds tracing the same exec storm at once (same records, same machine state):
paired per-exec tracer CPU (schedstat, all threads), rounds with the start order swapped.
A side is ab.py with HXP factors; `before...` runs the build in HXBEFORE. Loop: ../pairtool.py."""
import os, subprocess, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pairtool
HERE = os.path.dirname(os.path.abspath(__file__))

launch = pairtool.ab_launcher(os.path.join(HERE, "ab.py"))


pairtool.main(launch, "exec_storm", "exec", "hxp")

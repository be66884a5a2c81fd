# Scratch measurement tool of bench/profiles/hrate2.md (issue 15); not shipped, not a test.
"""../hexec/pair.py's sides, plus: a name ending in +wide has its stdout pipe widened by the parent
(F_SETPIPE_SZ to pipe-max-size); STORM picks the storm. Loop: ../pairtool.py."""
import os, subprocess, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pairtool
HERE = os.path.dirname(os.path.abspath(__file__))

def launch(name, root, env):
    wide = name.endswith("+wide")
    p = _launch(name[:-5] if wide else name, root, env)
    if wide:
        import fcntl
        fcntl.fcntl(p.stdout.fileno(), 1031, int(open("/proc/sys/fs/pipe-max-size").read()))
    return p


_launch = pairtool.ab_launcher(os.path.join(HERE, "..", "hexec", "ab.py"))


pairtool.main(launch, "exec_storm", "exec", "hxp")

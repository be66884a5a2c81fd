# Scratch measurement tool of bench/profiles/htyped-ring.md (issue 15); not shipped, not a test.
"""This tree's compiled build at two gcc levels, tracing the same storm at once: side `O1` runs
the build in $O1_DIR, `O2` the one in $O2_DIR (scripts/build_native.py --out, CFLAGS changed).
Loop: ../pairtool.py."""
import os, subprocess, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pairtool


def launch(name, root, env):
    env["AGENTTRACE_NATIVE_DIR"] = os.environ[f"{name}_DIR"]
    env["AGENTTRACE_REQUIRE_NATIVE"] = "1"
    exe = os.path.join(os.path.dirname(sys.executable), "agenttrace")
    return subprocess.Popen([exe, "run", "--cgroup", root, "--mode", env["MODE"]],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)


pairtool.main(launch, "exec_storm", "op", "hol")

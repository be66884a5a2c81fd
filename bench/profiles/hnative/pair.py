# Scratch measurement tool of bench/profiles/hnative.md (issue 15); not shipped, not a test.
"""The same tree twice, compiled (`native`) and pure (`pure`: AGENTTRACE_NATIVE=0), tracing the same
storm at once (STORM=exec_storm|connect_storm|refused_storm): paired tracer CPU per operation.
BEFORE_EXE=PATH adds a third side, `before`: another build's agenttrace (the session's start).
Loop: ../pairtool.py."""
import os, subprocess, sys
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import pairtool
HERE = os.path.dirname(os.path.abspath(__file__))

def launch(name, root, env):
    env["AGENTTRACE_NATIVE"] = "0" if name == "pure" else "1"
    env["AGENTTRACE_REQUIRE_NATIVE"] = "1" if name == "native" else "0"
    exe = os.environ["BEFORE_EXE"] if name == "before" else os.path.join(os.path.dirname(sys.executable), "agenttrace")
    if name == "before":
        env.pop("AGENTTRACE_REQUIRE_NATIVE")
    return subprocess.Popen([exe, "run", "--cgroup", root, "--mode", env["MODE"]],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)


pairtool.main(launch, "connect_storm", "op", "htcp")

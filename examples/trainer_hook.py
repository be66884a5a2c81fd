#!/usr/bin/env python3
"""A trainer-side hook: run one episode in its own agent cgroup, labelled for agenttrace, and
end it with a penalty as soon as the daemon reports an alert of severity >= high for it.

    trainer_hook.py --root /sys/fs/cgroup/agents --episode ep-7 --penalties p.jsonl -- python agent.py

The daemon must watch --root (config `agents: [{cgroup: /agents}]`) and serve its event
socket. The episode's cgroup gets `user.agenttrace.episode` (and `run_id` when given) before
the agent starts, so every record of the episode, from its first exec, names it. Exit status:
0 the episode ended by itself, 1 it was ended for an alert.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from agenttrace.client import Client


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, help="the watched cgroup (absolute cgroupfs path)")
    ap.add_argument("--episode", required=True)
    ap.add_argument("--run-id")
    ap.add_argument("--socket", default="/run/agenttrace/events.sock")
    ap.add_argument("--penalties", required=True, help="JSON lines: one per ended episode")
    ap.add_argument("--penalty", type=float, default=-1.0)
    ap.add_argument("cmd", nargs="+")
    a = ap.parse_args()

    cg = os.path.join(a.root, a.episode)
    os.mkdir(cg)
    os.setxattr(cg, "user.agenttrace.episode", a.episode.encode())
    if a.run_id:
        os.setxattr(cg, "user.agenttrace.run_id", a.run_id.encode())
    # subscribe before the agent starts: nothing it does can come before we listen
    client = Client(a.socket, labels={"episode": a.episode}, kinds=["alert"], min_severity="high")
    client.next(timeout=0.5)

    def enter():
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write("0")
    agent = subprocess.Popen(a.cmd, preexec_fn=enter)
    ended_for = None
    try:
        while agent.poll() is None:
            rec = client.next(timeout=0.1)
            if rec is None:
                continue
            ended_for = rec
            with open(os.path.join(cg, "cgroup.kill"), "w") as f:   # the whole episode, at once
                f.write("1")
            agent.wait()
    finally:
        client.close()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        for _ in range(500):                 # the cgroup empties once the kill is through
            try:
                os.rmdir(cg)
                break
            except OSError:
                time.sleep(0.01)
    if ended_for is None:
        print(f"episode {a.episode}: ended by itself ({agent.returncode})")
        return 0
    rule = ended_for["rule"]
    with open(a.penalties, "a") as f:
        f.write(json.dumps({"episode": a.episode, "run_id": a.run_id, "penalty": a.penalty,
                            "rule": rule["id"], "severity": rule["severity"],
                            "outcome": rule["outcome"], "alert_ts": ended_for["ts"]}) + "\n")
    print(f"episode {a.episode}: ended for {rule['id']} ({rule['severity']}), penalty {a.penalty}")
    return 1


if __name__ == "__main__":
    sys.exit(main())

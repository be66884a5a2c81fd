"""Builds the C load generators (bench/loadgen/*.c) with gcc and runs them.

Each generator times itself (CLOCK_MONOTONIC around the loop only, after it has joined the
agent cgroup) and prints one JSON line, so the harness's own start-up and Python overhead never
enter a workload's elapsed time."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SRC_DIR = Path(__file__).resolve().parent / "loadgen"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-pthread"]

# Audit login uid given to processes inside the agent cgroup, in every configuration, so that
# auditd's rules can be scoped to them (auditd has no cgroup filter).
BENCH_AUID = 424242


class LoadgenError(RuntimeError):
    pass


def build(bin_dir: Path) -> dict[str, Path]:
    """Compile every generator into bin_dir; a binary is rebuilt only when its sources changed
    (the hash of the .c file and the shared headers is kept beside it)."""
    if shutil.which("gcc") is None:
        raise LoadgenError("gcc not found: the load generators are C and are built by the harness")
    bin_dir.mkdir(parents=True, exist_ok=True)
    headers = b"".join(p.read_bytes() for p in sorted(SRC_DIR.glob("*.h")))
    out = {}
    for src in sorted(SRC_DIR.glob("*.c")):
        exe = bin_dir / src.stem
        digest = hashlib.sha256(src.read_bytes() + headers + " ".join(CFLAGS).encode()).hexdigest()
        stamp = bin_dir / f".{src.stem}.sha256"
        if not (exe.exists() and stamp.exists() and stamp.read_text() == digest):
            r = subprocess.run(["gcc", *CFLAGS, "-o", str(exe), str(src)], capture_output=True, text=True)
            if r.returncode != 0:
                raise LoadgenError(f"gcc failed on {src}:\n{r.stderr}")
            stamp.write_text(digest)
        out[src.stem] = exe
    return out


@dataclass
class GenResult:
    gen: str
    n: int
    elapsed_ns: int
    cpu_ns: int
    errors: int
    extra: dict


def run(exe: Path, args: list, cgroup: Path | None, timeout: float = 300.0) -> GenResult:
    """Run one generator; inside the agent cgroup when `cgroup` is given (the generator joins
    it itself before timing anything and takes the bench audit login uid)."""
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    if cgroup is not None:
        env["BENCH_CGROUP"] = str(cgroup)
        env["BENCH_AUID"] = str(BENCH_AUID)
    proc = subprocess.Popen([str(exe), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our child, by pid
        proc.communicate()
        raise LoadgenError(f"{exe.name} {args}: did not finish in {timeout:.0f} s")
    if proc.returncode != 0:
        raise LoadgenError(f"{exe.name} {args}: exit {proc.returncode}: {err.strip()}")
    try:
        rec = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise LoadgenError(f"{exe.name} {args}: unreadable result {out!r}: {e}") from e
    extra = {k: v for k, v in rec.items() if k not in ("gen", "n", "elapsed_ns", "cpu_ns", "errors")}
    if rec["elapsed_ns"] <= 0:
        raise LoadgenError(f"{exe.name} {args}: non-positive elapsed time {rec['elapsed_ns']}")
    return GenResult(rec["gen"], int(rec["n"]), int(rec["elapsed_ns"]), int(rec["cpu_ns"]), int(rec["errors"]), extra)

#!/usr/bin/env python3
"""Exercise the real NVML path on a machine with an NVIDIA GPU.

    sudo .venv/bin/python tests/gpu_real_check.py [--fence] [--hold-s N]

1. Lists every GPU (index, UUID, name, memory) and the processes NVML reports on each.
2. Makes a temporary watched cgroup with one agent child, starts a short CUDA-using process
   in it (PyTorch when importable, else a tiny ctypes program on libcuda: cuInit + a context
   + a 64 MiB allocation), and samples NVML until the tracker reports that process as a
   `gpu` "acquired" event attributed to the agent, then "released" after it exits.
3. With --fence (needs BCC): loads probes/device.c in enforce mode on the same cgroup and
   shows that opening /dev/nvidiactl from the agent fails with EPERM and is reported.

Where there is no GPU, no driver or no NVML it prints `SKIP: <reason>` and exits 0; exit 1
means a check ran and failed. Not collected by pytest (no test_ prefix): CI has no GPU.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _import_agenttrace():
    try:
        import agenttrace  # noqa: F401
    except ImportError:
        # Not installed (a bare checkout on a GPU box): map the import name onto tracer/.
        spec = importlib.util.spec_from_file_location("agenttrace", REPO / "tracer" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "tracer")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["agenttrace"] = mod
        spec.loader.exec_module(mod)


def skip(reason: str) -> None:
    print(f"SKIP: {reason}")
    sys.exit(0)


def fail(reason: str) -> None:
    print(f"FAIL: {reason}")
    sys.exit(1)


TORCH_HOLDER = r"""
import sys, time, torch
x = torch.ones(1 << 26, device="cuda")        # 256 MiB
torch.cuda.synchronize()
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
"""

CTYPES_HOLDER = r"""
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
def ok(rc, what):
    if rc != 0:
        print(f"error {what} rc={rc}", flush=True); sys.exit(3)
ok(cuda.cuInit(0), "cuInit")
dev = ctypes.c_int(); ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p(); ok(cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev), "cuCtxCreate")
ptr = ctypes.c_uint64(); ok(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(64 << 20)), "cuMemAlloc")
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
"""


def holder_program() -> tuple[str, str]:
    try:
        import torch  # noqa: F401
        if torch.cuda.is_available():
            return "pytorch", TORCH_HOLDER
    except Exception:  # noqa: BLE001 - any torch problem: fall back to libcuda
        pass
    import ctypes
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        skip(f"NVML works but neither PyTorch with CUDA nor libcuda.so.1 is available to start a GPU process ({e})")
    return "ctypes-libcuda", CTYPES_HOLDER


def list_gpus(backend, resolver) -> None:
    devs = backend.devices()
    print(f"{len(devs)} GPU(s):")
    for d in devs:
        sm, mem = backend.utilization(d.index)
        print(f"  [{d.index}] {d.name}  {d.uuid}  {d.memory_total_mib} MiB  sm={sm}% mem={mem}%")
        procs = backend.processes(d.index)
        putil = backend.process_utilization(d.index, int(time.time() * 1e6) - 5_000_000)
        if not procs:
            print("      (no processes)")
        for p in procs:
            r = resolver(p.pid)
            who = f"{r[0]['comm']} {r[0]['exe']}" if r else "(not visible in this pid namespace)"
            agent = (r[1] or {}).get("id") if r else None
            print(f"      pid {p.pid:>7} {p.kind:8} {p.used_memory_mib} MiB util={putil.get(p.pid)} "
                  f"agent={agent} {who}")


def wait_for(sampler, tracker, want, deadline_s: float):
    """Sample until an event satisfying want(event) appears; returns it or None."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        sampler.sample_once()
        found = None
        for ev in tracker.update(sampler.latest):
            print("  event:", json.dumps(ev.record, default=str))
            if found is None and want(ev):
                found = ev
        if found is not None:
            return found
        time.sleep(sampler.interval_s)
    return None


def fence_check(watched: Path, agent: Path, GpuConfig, GpuFence, nvidia_uvm_major) -> None:
    try:
        from agenttrace.kernel.loader import Probes
        import ctypes as C
    except ImportError as e:
        print(f"fence: SKIP: BCC or the loader is not importable ({e})")
        return
    node = "/dev/nvidiactl" if os.path.exists("/dev/nvidiactl") else "/dev/nvidia0"
    p = Probes(features=("device",), extra_cflags=[f"-DAT_NVIDIA_UVM_MAJOR={nvidia_uvm_major() or 0}"])
    p.load()
    seen = []

    def cb(ctx, data, size):
        from agenttrace.kernel.wire import Device
        seen.append(Device.from_buffer_copy(C.string_at(data, C.sizeof(Device))))

    p.bpf[b"events"].open_ring_buffer(cb)
    try:
        p.watch(watched)
        GpuFence(p, GpuConfig(), "enforce").install()
        code = f"import os\ntry:\n os.close(os.open({node!r}, os.O_RDWR)); print(0)\nexcept OSError as e: print(e.errno)"
        out = subprocess.run([sys.executable, "-c", code], preexec_fn=_enter(agent), capture_output=True,
                             text=True, check=True).stdout.strip()
        p.bpf.ring_buffer_poll(100)
        print(f"fence: open({node}) from the agent in enforce mode -> errno {out}; "
              f"{len(seen)} device record(s): " +
              ", ".join(f"{e.major}:{e.minor} verdict={'blocked' if e.verdict else 'allowed'}" for e in seen))
        if int(out) != errno.EPERM or not any(e.verdict for e in seen):
            fail("the device fence did not deny the NVIDIA device in enforce mode")
    finally:
        p.close()


def _enter(cg: Path):
    procs = str(cg / "cgroup.procs")

    def f():
        with open(procs, "w") as fh:
            fh.write("0")
    return f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fence", action="store_true", help="also check the kernel device fence (needs BCC)")
    ap.add_argument("--hold-s", type=float, default=20.0, help="how long the CUDA process holds the GPU")
    args = ap.parse_args()

    _import_agenttrace()
    from agenttrace.enrich import cgroups
    from agenttrace.gpu.service import (GpuConfig, GpuFence, GpuSampler, GpuTracker, GpuUnavailable, NvmlBackend,
                                ProcfsResolver, nvidia_uvm_major)

    try:
        backend = NvmlBackend()
        backend.init()
    except GpuUnavailable as e:
        skip(e.reason)
    print("NVML ok; driver", _driver_version())

    if os.geteuid() != 0:
        list_gpus(backend, lambda pid: None)
        skip("the attribution check needs root (it makes a cgroup)")
    mount = Path(cgroups.cgroup2_mount())
    watched = mount / f"agenttrace-gpucheck-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    agent = watched / "agent-1"
    watched.mkdir()
    agent.mkdir()
    child = None
    try:
        resolver = ProcfsResolver([str(watched)])
        list_gpus(backend, resolver)
        how, program = holder_program()
        print(f"starting a CUDA process ({how}) in {agent}")
        child = subprocess.Popen([sys.executable, "-c", program, str(args.hold_s)], preexec_fn=_enter(agent),
                                 stdout=subprocess.PIPE, text=True)
        line = child.stdout.readline().strip()
        if line != "ready":
            fail(f"the CUDA process did not start: {line!r} (exit {child.poll()})")
        sampler = GpuSampler(backend, 0.5, notice=lambda c, m: print(f"  notice {c}: {m}"))
        tracker = GpuTracker(resolver, GpuConfig(thresholds={"memory_mib": 32}))
        ev = wait_for(sampler, tracker, lambda e: e.pid == child.pid and e.record["gpu"]["change"] == "acquired", 60)
        if ev is None:
            pids = sorted(sampler.latest.by_pid) if sampler.latest else []
            fail(f"NVML never listed pid {child.pid} (it listed {pids}); "
                 "in a container NVML reports host pids, run this on the host")
        a = ev.record["agent"] or {}
        if a.get("id") != "agent-1" or a.get("cgroup_id") != os.stat(agent).st_ino:
            fail(f"attributed to {a}, expected agent-1")
        print(f"OK: pid {child.pid} attributed to agent {a['id']} ({a['cgroup']}) on GPU "
              f"{ev.record['gpu']['index']} {ev.record['gpu']['name']} with {ev.record['gpu']['used_memory_mib']} MiB")
        child.kill()
        child.wait()
        rel = wait_for(sampler, tracker, lambda e: e.pid == child.pid and e.record["gpu"]["change"] == "released", 60)
        if rel is None:
            fail("no released event after the CUDA process exited")
        print("OK: released after exit")
        if args.fence:
            fence_check(watched, agent, GpuConfig, GpuFence, nvidia_uvm_major)
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        backend.shutdown()
        for d in (agent, watched):
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
    print("PASS")
    return 0


def _driver_version() -> str:
    try:
        import pynvml
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - informational only
        return "(unknown)"


if __name__ == "__main__":
    sys.exit(main())

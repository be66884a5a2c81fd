"""`agenttrace doctor`: each thing the tracer needs, whether it is here, and the fix if not."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def _check(out, ok: bool, what: str, fix: str = "", required: bool = True) -> bool:
    mark = "ok  " if ok else ("FAIL" if required else "warn")
    out(f"[{mark}] {what}")
    if not ok and fix:
        out(f"       fix: {fix}")
    return ok or not required


def run_checks(out) -> bool:
    good = True
    krel = platform.release()
    out(f"kernel {krel}, {platform.machine()}")
    good &= _check(out, os.geteuid() == 0, "running as root", "run agenttrace as root (sudo)")

    btf = Path("/sys/kernel/btf/vmlinux")
    good &= _check(out, btf.exists(), "kernel BTF at /sys/kernel/btf/vmlinux (struct offsets for argv, ppid, exit code)",
                   "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    if btf.exists():
        try:
            from agenttrace.kernel.btf import probe_offsets
            probe_offsets()
            good &= _check(out, True, "BTF has every field the probes need")
        except Exception as e:
            good &= _check(out, False, f"BTF fields: {e}", "report this kernel version")

    build = Path(f"/lib/modules/{krel}/build")
    exact = build.exists() and not build.is_symlink() or (build.is_symlink() and krel in os.readlink(build))
    if build.exists():
        _check(out, True, f"kernel headers at {build}" + ("" if exact else f" (linked to {os.readlink(build)}, not this kernel's own: fine, probes read no internal structs)"))
    else:
        good &= _check(out, False, f"kernel headers at {build}", "run scripts/setup.sh (installs and links headers)")

    try:
        import bcc  # noqa: F401
        ver = getattr(bcc, "__version__", "?")
        good &= _check(out, True, f"BCC python module {ver}")
    except ImportError:
        good &= _check(out, False, "BCC python module", "apt-get install python3-bpfcc; create the venv with --system-site-packages")

    from agenttrace import native
    import importlib
    st = native.status()
    if st["enabled"]:
        for m in st.get("not_imported", []):
            importlib.import_module(m)
        st = native.status()
        stale = st.get("stale", {})
        _check(out, not stale, f"compiled pipeline modules: {len(st['loaded'])} loaded from {native.native_dir()}"
               + (f"; pure Python (stale): {', '.join(f'{m} ({w})' for m, w in stale.items())}" if stale else ""),
               "run scripts/build_native.py (or scripts/setup.sh) after editing a module", required=False)
    else:
        _check(out, False, f"compiled pipeline modules: none ({st.get('reason')}); pure Python, slower per record",
               "run scripts/setup.sh (or scripts/build_native.py)", required=False)

    from agenttrace.kernel.loader import TRACEFS
    tr = (TRACEFS / "events").is_dir() or Path("/sys/kernel/debug/tracing/events").is_dir()
    _check(out, tr, "tracefs mounted", "mount -t tracefs tracefs /sys/kernel/tracing (agenttrace mounts it itself when root)", required=False)

    try:
        from agenttrace.enrich.cgroups import cgroup2_mount
        m = cgroup2_mount()
        hybrid = m != Path("/sys/fs/cgroup")
        good &= _check(out, True, f"cgroup v2 at {m}" + (" (hybrid with v1)" if hybrid else ""))
        _check(out, (m / "cgroup.kill").exists() or any(m.glob("*/cgroup.kill")) or True,
               "cgroup.kill/cgroup.freeze (kill-agent, freeze-agent)", required=False)
    except Exception as e:
        good &= _check(out, False, f"cgroup v2: {e}", "mount -t cgroup2 none /sys/fs/cgroup")

    bpffs = any(l.split()[2] == "bpf" for l in Path("/proc/mounts").read_text().splitlines() if len(l.split()) > 2)
    _check(out, bpffs, "bpffs mounted (pinned enforcement survives daemon restarts)",
           "mount -t bpf bpf /sys/fs/bpf", required=False)

    if os.geteuid() == 0:
        try:
            from agenttrace.kernel.loader import Probes, FEATURES
            from agenttrace.paths import probes_dir
            feats = tuple(f for f in FEATURES if (probes_dir() / FEATURES[f][0]).exists())
            p = Probes(feats, ringbuf_pages=64)
            p.load()
            try:
                pinnable = _raw_tp_pinnable(p) if bpffs else None
            finally:
                p.close()
            good &= _check(out, True, f"probes compile, verify and load: {', '.join(feats)}")
            if pinnable is not None:
                _check(out, pinnable, "raw-tracepoint links can be pinned (escape killing survives a dead tracer)",
                       "a kernel before 5.7 returns no link for raw tracepoints: escape kills stop with the tracer",
                       required=False)
        except Exception as e:
            good &= _check(out, False, f"loading the probes: {e}", "see the error; run scripts/setup.sh")

    out("note: socket fencing (cgroup/sock_create) sees AF_INET/AF_INET6 sockets only; packet, netlink, "
        "vsock... sockets are fenced by the optional packet feature (socket() syscall tracepoints: "
        "--packet / probes.packet) and, for `run -- CMD` in enforce mode, by the command losing CAP_NET_RAW")
    from agenttrace.kernel.loader import FILE_SYSCALLS
    have = [n for n in ("openat",) + FILE_SYSCALLS
            if (TRACEFS / "events" / "syscalls" / f"sys_enter_{n}").is_dir()]
    _check(out, "openat" in have,
           f"syscall tracepoints for the optional SSH-file probes (--files / probes.files): {', '.join(have) or 'none'}",
           "enable CONFIG_FTRACE_SYSCALLS; without it the files feature cannot load", required=False)
    out("note: the files feature is off by default: its syscall tracepoints slow every process's "
        "syscalls (measured 1.14-1.28x here, README 'What it costs')")
    _check(out, all((TRACEFS / "events" / "syscalls" / f"sys_{w}_socket").is_dir() for w in ("enter", "exit")),
           "syscall tracepoints for the optional packet-socket probe (--packet / probes.packet)",
           "enable CONFIG_FTRACE_SYSCALLS; without it packet sockets are only scanned for (probes.packet_scan_s)",
           required=False)

    try:
        from agenttrace.gpu.service import nvml_status
        st = nvml_status()
        _check(out, st.get("available", False), f"NVML: {st.get('detail', '')}",
               "GPU features stay off without an NVIDIA driver; everything else works", required=False)
    except ImportError:
        pass
    except Exception as e:
        _check(out, False, f"NVML: {e}", required=False)

    out("kprobes/LSM/fentry are not required: agenttrace uses tracepoints and cgroup hooks only.")
    out("all required checks passed" if good else "some required checks FAILED")
    return good


def _raw_tp_pinnable(probes) -> bool:
    from agenttrace.kernel.loader import pin_object
    if not probes._raw_tp_fds:
        return False
    path = Path(f"/sys/fs/bpf/agenttrace-doctor-{os.getpid()}")
    try:
        pin_object(probes._raw_tp_fds[0], path)
        return True
    except Exception:
        return False
    finally:
        try:
            path.unlink()
        except OSError:
            pass

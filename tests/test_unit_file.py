"""The systemd unit passes `systemd-analyze verify` (warnings count as failures) and says what
the daemon and the config expect."""
from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agenttrace.config import DEFAULT_PATH, DEFAULT_SOCKET

UNIT = Path(__file__).resolve().parent.parent / "packaging" / "agenttrace.service"
EXEC = "/opt/agenttrace/bin/agenttrace"   # the Debian package's prefix (make deb)


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.fail("systemd-analyze not found: scripts/setup.sh --test installs Debian's 'systemd' package")
    return exe


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # systemd-analyze checks that ExecStart's binary exists; point it at a real executable so
    # what is verified is the unit, not this machine's install.
    fake = tmp_path / "agenttrace"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    p = tmp_path / "agenttrace.service"
    p.write_text(unit_text.replace(EXEC, str(fake)))
    return subprocess.run([analyze(), "verify", "--man=no", str(p)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})


def test_unit_passes_systemd_analyze_verify(tmp_path):
    r = verify(UNIT.read_text(), tmp_path)
    assert r.returncode == 0, r.stderr
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "agenttrace" in ln]
    assert ours == [], "\n".join(ours)


def test_verify_catches_a_broken_unit(tmp_path):
    # The check above would be worthless if verify stayed quiet on mistakes.
    r = verify(UNIT.read_text().replace("Type=notify", "Type=notifyy"), tmp_path)
    assert "notifyy" in r.stderr


def unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"))
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(UNIT.read_text())
    return cp


def test_service_contract():
    s = unit()["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"] == f"{EXEC} daemon --config {DEFAULT_PATH}"
    assert s["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert s["Restart"] == "on-failure"
    assert re.fullmatch(r"\d+s?", s["WatchdogSec"])
    assert s["StateDirectory"] == "agenttrace" and s["RuntimeDirectory"] == "agenttrace"
    # The tail socket the config defaults to lives in the runtime directory systemd makes.
    assert os.path.dirname(DEFAULT_SOCKET) == "/run/" + s["RuntimeDirectory"]
    assert s["NoNewPrivileges"] == "yes"
    assert s["LimitMEMLOCK"] == "infinity"


def test_every_capability_is_justified_and_nothing_more():
    caps = unit()["Service"]["CapabilityBoundingSet"].split()
    assert set(caps) == {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE",
                         "CAP_KILL", "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"}
    comments = "\n".join(ln for ln in UNIT.read_text().splitlines() if ln.startswith("#"))
    for c in caps:
        assert re.search(rf"^#\s+{c}\s+\S", comments, re.M), f"{c} has no justification comment"
    assert "AmbientCapabilities" not in unit()["Service"]


def test_no_hardening_option_that_breaks_bpf_or_nvml():
    s = unit()["Service"]
    for key in ("ProtectKernelTunables", "ProtectControlGroups", "ProtectKernelModules",
                "MemoryDenyWriteExecute", "PrivateDevices", "ProtectClock", "DevicePolicy", "ProtectProc"):
        assert s.get(key, "no") in ("no", "false", "default"), key
    assert s["ProtectSystem"] == "strict"

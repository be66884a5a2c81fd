"""`make deb` → dpkg -i → agenttrace doctor and systemd-analyze verify on the installed unit →
dpkg --purge, on this machine, leaving nothing behind. The package's venv is its own
(/opt/agenttrace): the suite's .venv is neither used nor touched."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFIX = Path("/opt/agenttrace")
INSTALLED = [PREFIX, Path("/usr/bin/agenttrace"), Path("/lib/systemd/system/agenttrace.service"),
             Path("/etc/agenttrace"), Path("/usr/share/man/man8/agenttrace.8.gz"), Path("/usr/share/doc/agenttrace")]


def sh(*cmd, check=True, timeout=600, **kw):
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))} → {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture
def clean_machine(require_bpf):
    if os.geteuid() != 0 or not shutil.which("dpkg-deb"):
        pytest.fail("needs root and dpkg (Debian)")
    if sh("dpkg-query", "-W", "agenttrace", check=False).returncode == 0 or any(p.exists() for p in INSTALLED):
        # somebody's real install: this test must not replace or purge it
        pytest.skip("agenttrace is installed on this machine (package or files); not touching it")
    yield
    if sh("dpkg-query", "-W", "agenttrace", check=False).returncode == 0:
        sh("dpkg", "--purge", "agenttrace", check=False)


def test_deb_install_doctor_verify_purge(tmp_path, clean_machine):
    suite_venv = ROOT / ".venv" / "bin" / "python"
    before = suite_venv.stat().st_mtime_ns if suite_venv.exists() else None
    out = tmp_path / "deb"
    # gzip -1: the package's files are what this test checks, not how hard they are compressed
    sh("make", "-C", ROOT, "deb", f"DEB_OUT={out}", env={**os.environ, "DEB_ZLEVEL": "1"})
    debs = list(out.glob("agenttrace_*.deb"))
    assert len(debs) == 1
    deb = debs[0]
    info = sh("dpkg-deb", "--field", deb, "Package", "Depends").stdout
    assert "agenttrace" in info and "python3-bpfcc" in info
    files = sh("dpkg-deb", "--contents", deb).stdout
    assert "./opt/agenttrace/bin/agenttrace" in files and "./lib/systemd/system/agenttrace.service" in files
    assert "./usr/share/man/man8/agenttrace.8.gz" in files and ".pyc" not in files

    sh("dpkg", "-i", deb)
    assert sh("dpkg-query", "-W", "-f", "${Status}", "agenttrace").stdout == "install ok installed"
    # the installed command runs the package's own code, not this checkout's
    where = sh("/opt/agenttrace/bin/python", "-c", "import agenttrace, bcc; print(agenttrace.__file__)",
               cwd="/").stdout.strip()
    assert where.startswith("/opt/agenttrace/lib/"), where
    assert sh("/usr/bin/agenttrace", "--version", cwd="/").stdout.startswith("agenttrace ")
    # postinst compiled what `run` and the shipped config load: the first start finds them
    prep = sh("/usr/bin/agenttrace", "prepare", cwd="/").stdout.splitlines()
    assert [ln.split(":")[0] for ln in prep[:3]] == ["run", "run --allow-egress",
                                                      "daemon --config /etc/agenttrace/agenttrace.yaml"], prep
    assert all("already in the cache" in ln or "same probes as above" in ln for ln in prep[:3]), prep
    doc = sh("/usr/bin/agenttrace", "doctor", cwd="/")
    assert "all required checks passed" in doc.stdout
    # the package's venv holds the compiled pipeline modules, and they are what it loads
    assert "./opt/agenttrace/lib/agenttrace-native/manifest.json" in files
    assert "[ok  ] compiled pipeline modules: " in doc.stdout, doc.stdout
    so = sh("/opt/agenttrace/bin/python", "-c", "import agenttrace.session.pipeline as p; print(p.__file__)",
            cwd="/").stdout.strip()
    assert so.startswith("/opt/agenttrace/lib/agenttrace-native/") and so.endswith(".so"), so
    unit = Path("/lib/systemd/system/agenttrace.service")
    assert "ExecStart=/opt/agenttrace/bin/agenttrace daemon" in unit.read_text()
    r = sh("systemd-analyze", "verify", "--man=no", unit, check=False, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "agenttrace" in ln]
    assert r.returncode == 0 and ours == [], r.stderr
    cfg = Path("/etc/agenttrace/agenttrace.yaml")
    assert oct(cfg.stat().st_mode & 0o777) == "0o600" and oct(cfg.parent.stat().st_mode & 0o777) == "0o700"
    sh("/opt/agenttrace/bin/python", "-c", f"from agenttrace.config import load_config; load_config('{cfg}')", cwd="/")
    man = sh("man", "-l", "/usr/share/man/man8/agenttrace.8.gz", env={**os.environ, "MANWIDTH": "80"})
    assert "agenttrace - eBPF tracer" in man.stdout

    sh("dpkg", "--purge", "agenttrace")
    left = [str(p) for p in INSTALLED if p.exists() or p.is_symlink()]
    assert left == [], f"left behind after purge: {left}"
    assert sh("dpkg-query", "-W", "agenttrace", check=False).returncode != 0
    if before is not None:
        assert suite_venv.stat().st_mtime_ns == before

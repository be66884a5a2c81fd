"""A real rsyslogd on loopback for delivery tests: imtcp (RFC 6587 framing, octet counting
included) and imudp on ports of its own, every message written to one file as
`PROTO<TAB>MSGID<TAB>MSG`. Started with its own config, pid file and work directory; stopped by
its pid."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"

CONF = """\
global(workDirectory="{work}" maxMessageSize="256k")
module(load="imtcp")
module(load="imudp")
template(name="agenttrace_lines" type="string" string="%inputname%\\t%msgid%\\t%msg%\\n")
ruleset(name="agenttrace") {{
  action(type="omfile" file="{out}" template="agenttrace_lines")
}}
input(type="imtcp" address="127.0.0.1" port="{tcp}" ruleset="agenttrace")
input(type="imudp" address="127.0.0.1" port="{udp}" ruleset="agenttrace" rcvbufSize="8m")
"""


def _free_port(kind: int) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _udp_bound(port: int) -> bool:
    hexport = f":{port:04X}"
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        if line.split()[1].endswith(hexport):
            return True
    return False


class Rsyslogd:
    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.out = self.dir / "received.log"
        self.tcp_port = _free_port(socket.SOCK_STREAM)
        self.udp_port = _free_port(socket.SOCK_DGRAM)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "Rsyslogd":
        work = self.dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "rsyslog.conf"
        conf.write_text(CONF.format(work=work, out=self.out, tcp=self.tcp_port, udp=self.udp_port))
        check = subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr + check.stdout
        # -n: stay in the foreground so the pid is ours; -i: its own pid file, not the system's
        self.proc = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")],
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "rsyslogd.err", "wb"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "rsyslogd.err").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.tcp_port), timeout=1).close()
                if _udp_bound(self.udp_port):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("rsyslogd did not start listening")

    def lines(self) -> list[tuple[str, str, str]]:
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t", 2)
            if len(parts) == 3:
                out.append((parts[0], parts[1], parts[2]))
        return out

    def wait_lines(self, n: int, timeout: float = 60.0) -> list[tuple[str, str, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.lines()
            if len(got) >= n:
                time.sleep(0.3)    # anything beyond n (a duplicate) has time to show too
                return self.lines()
            time.sleep(0.1)
        return self.lines()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

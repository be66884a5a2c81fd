"""A private test network with real servers, so network tests never send a packet off the machine.

Topology (built with pyroute2, torn down afterwards)::

    agent netns                               server netns
    ───────────                               ────────────
    up0  172.31.255.2/30  ──veth──  172.31.255.1/30    (the "uplink" gateway)
         2001:db8:ffff::2/64        2001:db8:ffff::1/64
    lan0 10.77.0.2/24     ──veth──  10.77.0.5/24       (the internal host)
         fd77::2/64                 fd77::5/64
    routes: 203.0.113.0/24, 198.51.100.0/24,           lo: 203.0.113.10  ssh bastion  (sshd :22, :443)
            192.0.2.0/24 via 172.31.255.1,                 203.0.113.20  mining pool  (stratum :3333, :443)
            2001:db8::/32 via 2001:db8:ffff::1;            198.51.100.7  web server   (http :80)
            NO default route (v4 or v6)                    2001:db8:10::10 ssh (:22, :443)
                                                           2001:db8:20::20 pool (:3333)
                                                           198.51.100.53 DNS resolver (udp+tcp :53)
                                                       lan0: 10.77.0.5, fd77::5  internal host (sshd :22, http :80)

The agent namespace has routes only to the documentation prefixes and the internal LAN, so a
workload that tries anything else gets ENETUNREACH instead of reaching the real network.

Servers: a real OpenSSH ``sshd`` (throwaway host and user keys, root login by key, TCP
forwarding and GatewayPorts on, so ``ssh -R`` opens a real port on the server side), plus one
Python helper process (this file run as a script) that hosts the stratum pool stub, the DNS
responder (dnspython) and a plain HTTP server that serves ``lab.http_root`` (a dumb-HTTP git
repository placed there can be cloned).

Use it as a context manager (``with NetLab() as lab:``) or through the pytest fixtures
``netlab`` (one lab per session) and ``netlab_fresh`` (one per test) in tests/netlab.py; the
demo (agenttrace.lab.demo) runs its misbehaving agent in it.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

# -- addresses ----------------------------------------------------------------------------------

SSH_HOST = "203.0.113.10"        # "external" bastion: sshd on 22 and 443
POOL_HOST = "203.0.113.20"       # "external" mining pool: stratum on 3333 and 443
WEB_HOST = "198.51.100.7"        # "external" web server: http on 80
# not in 192.0.2.0/24: that documentation range is the uplink subnet of some test VMs (eth0
# 192.0.2.2/24 here), where the daemon rightly counts it as the node's own, internal, network
DNS_HOST = "198.51.100.53"       # "external" resolver: udp+tcp 53
INTERNAL_HOST = "10.77.0.5"      # "internal" host on the LAN: sshd 22, http 80
AGENT_UPLINK_ADDR = "172.31.255.2"
SERVER_UPLINK_ADDR = "172.31.255.1"
AGENT_LAN_ADDR = "10.77.0.2"
EXTERNAL_PREFIXES = ("203.0.113.0/24", "198.51.100.0/24", "192.0.2.0/24")
INTERNAL_PREFIX = "10.77.0.0/24"
# IPv6: "external" hosts in the documentation prefix 2001:db8::/32, the LAN in ULA space.
SSH_HOST6 = "2001:db8:10::10"
POOL_HOST6 = "2001:db8:20::20"
INTERNAL_HOST6 = "fd77::5"
AGENT_UPLINK_ADDR6 = "2001:db8:ffff::2"
SERVER_UPLINK_ADDR6 = "2001:db8:ffff::1"
AGENT_LAN_ADDR6 = "fd77::2"
EXTERNAL_PREFIX6 = "2001:db8::/32"
IFA_F_NODAD = 0x02  # no duplicate-address detection: the addresses are usable at once

SSH_PORTS = (22, 443)
POOL_PORTS = (3333, 443)
HTTP_PORT = 80
DNS_PORT = 53

# Names the lab resolver answers. Pool names are the real pool domains so that the
# default rule pack's pool-domain lists match them; they resolve only inside the lab.
DEFAULT_RECORDS: dict[str, str] = {
    "pool.supportxmr.com": POOL_HOST,
    "xmr-eu1.nanopool.org": POOL_HOST,
    "stratum.pool.example": POOL_HOST,
    "bastion.example.com": SSH_HOST,
    "www.example.org": WEB_HOST,
    "git.corp.internal": INTERNAL_HOST,
    "db.corp.internal": INTERNAL_HOST,
}
# AAAA records only for names of their own, so lookups of the names above stay IPv4.
DEFAULT_RECORDS6: dict[str, str] = {
    "bastion6.example.com": SSH_HOST6,
    "pool6.supportxmr.com": POOL_HOST6,
}
DNS_TTL = 300

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_SLAVE = 1 << 19

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NetLabError(RuntimeError):
    pass


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def cgroup2_mount() -> Path:
    """The cgroup v2 mount point (agenttrace.enrich.cgroups holds the one parser)."""
    from agenttrace.enrich.cgroups import CgroupError, cgroup2_mount as mount
    try:
        return mount()
    except CgroupError as e:
        raise NetLabError(str(e)) from None


def _resolve_cgroup(cgroup: str | os.PathLike | None) -> Path | None:
    if cgroup is None:
        return None
    p = Path(cgroup)
    root = cgroup2_mount()
    if not str(p).startswith(str(root)):
        p = root / str(p).lstrip("/")
    if not (p / "cgroup.procs").exists():
        raise NetLabError(f"cgroup {p} has no cgroup.procs (not a cgroup v2 directory)")
    return p


def _enter_ns_preexec(netns_fd: int, cgroup: Path | None, resolv: str | None):
    """Runs in the forked child before exec: join the cgroup, then the netns, then hide the host
    resolver. Joining the cgroup first makes the exec itself (and everything after) an agent
    event; doing it here instead of through ``ip netns exec`` keeps ``ip`` out of the traces."""

    def preexec() -> None:
        if cgroup is not None:
            with open(cgroup / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        _check(_libc.setns(netns_fd, CLONE_NEWNET), "setns(netns)")
        if resolv is not None:
            # Same trick as `ip netns exec` with /etc/netns/NAME/resolv.conf: a private mount
            # namespace whose /etc/resolv.conf names the lab resolver, so glibc lookups stay in the lab.
            _check(_libc.unshare(CLONE_NEWNS), "unshare(mount ns)")
            _check(_libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "mount --make-rslave /")
            _check(_libc.mount(resolv.encode(), b"/etc/resolv.conf", None, MS_BIND, None),
                   "bind-mount resolv.conf")

    return preexec


# -- /proc/net/tcp ---------------------------------------------------------------------------------

def _hex_to_addr(h: str) -> str:
    if len(h) == 8:
        return socket.inet_ntop(socket.AF_INET, bytes.fromhex(h)[::-1])
    raw = bytes.fromhex(h)
    # /proc prints IPv6 as four host-order 32-bit words.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, raw)


def listening_tcp(pid: int) -> set[tuple[str, int]]:
    """(addr, port) of every listening TCP socket in the network namespace of process ``pid``.

    /proc/PID/net shows the namespace of that process, so no process has to be started inside it."""
    out: set[tuple[str, int]] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = cols[1].split(":")
            out.add((_hex_to_addr(addr), int(port, 16)))
    return out


# -- the lab -------------------------------------------------------------------------------------

class NetLab:
    """Two network namespaces, sshd and the Python servers. See the module docstring."""

    def __init__(self, records: Mapping[str, str] | None = None, sshd: bool = True,
                 ttls: Mapping[str, int] | None = None, records6: Mapping[str, str] | None = None):
        """records: name -> address, or name -> another name (answered as a CNAME chain);
        ttls: name -> TTL of its records (default DNS_TTL)."""
        self.id = secrets.token_hex(3)
        self.agent_ns = f"at-agent-{self.id}"
        self.server_ns = f"at-srv-{self.id}"
        self.records = dict(DEFAULT_RECORDS)
        if records:
            self.records.update(records)
        self.records6 = dict(DEFAULT_RECORDS6)
        self.records6.update(records6 or {})
        self.want_sshd = sshd
        self.ttls = dict(ttls or {})
        self.dir: Path | None = None
        self.sshd_proc: subprocess.Popen | None = None
        self.servers_proc: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []
        self._ns_fds: dict[str, int] = {}
        self._created_ns: list[str] = []

    # addresses, for tests
    ssh_host = SSH_HOST
    pool_host = POOL_HOST
    web_host = WEB_HOST
    dns_host = DNS_HOST
    internal_host = INTERNAL_HOST
    ssh_host6 = SSH_HOST6
    pool_host6 = POOL_HOST6
    internal_host6 = INTERNAL_HOST6
    agent_addr6 = AGENT_UPLINK_ADDR6
    agent_addr = AGENT_UPLINK_ADDR
    agent_lan_addr = AGENT_LAN_ADDR
    ssh_ports = SSH_PORTS
    pool_ports = POOL_PORTS
    http_port = HTTP_PORT
    dns_port = DNS_PORT

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> "NetLab":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if os.geteuid() != 0:
            raise NetLabError("NetLab needs root (network namespaces, sshd)")
        self._check_external_hosts_are_foreign()
        self.dir = Path(tempfile.mkdtemp(prefix=f"agenttrace-netlab-{self.id}-"))
        self.http_root.mkdir()
        self.resolv_conf.write_text(f"nameserver {DNS_HOST}\noptions timeout:1 attempts:1\n")
        self._build_network()
        self._start_servers()
        if self.want_sshd:
            self._start_sshd()

    @staticmethod
    def _check_external_hosts_are_foreign() -> None:
        """The lab's "external" hosts must not sit in a subnet of this node: the daemon counts
        node subnets as internal, so every scope the tests check would silently be wrong."""
        import ipaddress
        from agenttrace.enrich.nodenet import interface_networks
        try:
            nets = [n for n in interface_networks() if not n.is_loopback]
        except Exception:
            return
        for host in (SSH_HOST, POOL_HOST, WEB_HOST, DNS_HOST):
            ip = ipaddress.ip_address(host)
            clash = [str(n) for n in nets if ip.version == n.version and ip in n]
            if clash:
                raise NetLabError(f"the lab's external host {host} is inside this node's subnet "
                                  f"{clash[0]}: its scope would read internal; move the lab's hosts")

    def close(self) -> None:
        for p in reversed(self._procs):
            self._stop(p)
        self._procs.clear()
        for fd in self._ns_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._ns_fds.clear()
        from pyroute2 import netns
        for name in self._created_ns:
            # Removing a netns destroys its veth ends (and with them the peers in the other ns).
            with contextlib.suppress(Exception):
                netns.remove(name)
        self._created_ns.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    @staticmethod
    def _stop(p: subprocess.Popen) -> None:
        if p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()

    # -- paths ----------------------------------------------------------------------------------
    @property
    def http_root(self) -> Path:
        return self._d / "www"

    @property
    def resolv_conf(self) -> Path:
        return self._d / "resolv.conf"

    @property
    def user_key(self) -> Path:
        """Private key (ed25519, no passphrase) that root may log in with on every lab sshd."""
        return self._d / "id_user"

    @property
    def host_key(self) -> Path:
        return self._d / "ssh_host_ed25519_key"

    @property
    def sshd_log_path(self) -> Path:
        return self._d / "sshd.log"

    @property
    def server_log_path(self) -> Path:
        return self._d / "servers.jsonl"

    @property
    def _d(self) -> Path:
        if self.dir is None:
            raise NetLabError("NetLab is not started")
        return self.dir

    # -- network ---------------------------------------------------------------------------------
    def _build_network(self) -> None:
        from pyroute2 import IPRoute, netns

        for name in (self.agent_ns, self.server_ns):
            netns.create(name)
            self._created_ns.append(name)
            self._ns_fds[name] = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        up_a, up_s = f"atu{self.id}a", f"atu{self.id}s"
        lan_a, lan_s = f"atl{self.id}a", f"atl{self.id}s"
        with IPRoute(netns=self.agent_ns) as ipr:
            ipr.link("add", ifname=up_a, kind="veth", peer={"ifname": up_s, "net_ns_fd": self.server_ns})
            ipr.link("add", ifname=lan_a, kind="veth", peer={"ifname": lan_s, "net_ns_fd": self.server_ns})
            for ifname, addr, plen in ((up_a, AGENT_UPLINK_ADDR, 30), (lan_a, AGENT_LAN_ADDR, 24),
                                       (up_a, AGENT_UPLINK_ADDR6, 64), (lan_a, AGENT_LAN_ADDR6, 64)):
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=idx, address=addr, prefixlen=plen,
                         **({"flags": IFA_F_NODAD} if ":" in addr else {}))
                ipr.link("set", index=idx, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        with IPRoute(netns=self.server_ns) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            # The "external" hosts live on the server's loopback: reachable through the uplink
            # route, and no dummy module is needed (this kernel has none).
            for addr in (SSH_HOST, POOL_HOST, WEB_HOST, DNS_HOST):
                ipr.addr("add", index=lo, address=addr, prefixlen=32)
            for addr in (SSH_HOST6, POOL_HOST6):
                ipr.addr("add", index=lo, address=addr, prefixlen=128)
            for ifname, addr, plen in ((up_s, SERVER_UPLINK_ADDR, 30), (lan_s, INTERNAL_HOST, 24),
                                       (up_s, SERVER_UPLINK_ADDR6, 64), (lan_s, INTERNAL_HOST6, 64)):
                idx = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=idx, address=addr, prefixlen=plen,
                         **({"flags": IFA_F_NODAD} if ":" in addr else {}))
                ipr.link("set", index=idx, state="up")
        with IPRoute(netns=self.agent_ns) as ipr:
            for prefix in EXTERNAL_PREFIXES:
                ipr.route("add", dst=prefix, gateway=SERVER_UPLINK_ADDR)
            ipr.route("add", dst=EXTERNAL_PREFIX6, gateway=SERVER_UPLINK_ADDR6)

    def routes(self, ns: str | None = None) -> list[str]:
        """`ip route` lines of a lab namespace (the agent's by default)."""
        ns = ns or self.agent_ns
        out = subprocess.run(["ip", "-n", ns, "route", "show", "table", "all"], check=True,
                             capture_output=True, text=True).stdout
        return [l for l in out.splitlines() if l.strip()]

    # -- processes in the namespaces ------------------------------------------------------------
    def _popen_in(self, ns: str, argv: Sequence[str], cgroup=None, resolv: bool = True, **kw) -> subprocess.Popen:
        kw.setdefault("close_fds", True)
        p = subprocess.Popen(
            list(argv),
            preexec_fn=_enter_ns_preexec(self._ns_fds[ns], _resolve_cgroup(cgroup),
                                         str(self.resolv_conf) if resolv else None),
            **kw,
        )
        self._procs.append(p)
        return p

    def run_in_agent(self, argv: Sequence[str], cgroup: str | os.PathLike | None = None,
                     resolv: bool = True, **popen_kw) -> subprocess.Popen:
        """Start ``argv`` in the agent netns and (when given) in ``cgroup`` — an absolute cgroupfs
        path or one relative to the cgroup2 mount. The child joins the cgroup before it execs, so
        the exec is already inside it. With ``resolv`` its /etc/resolv.conf names the lab resolver.
        The lab kills it at teardown if it is still running."""
        return self._popen_in(self.agent_ns, argv, cgroup=cgroup, resolv=resolv, **popen_kw)

    def check_in_agent(self, argv: Sequence[str], cgroup=None, timeout: float = 60,
                       check: bool = False, input: bytes | None = None) -> subprocess.CompletedProcess:
        """Run to completion in the agent netns; returns stdout/stderr as text."""
        p = self.run_in_agent(argv, cgroup=cgroup, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise NetLabError(f"{argv!r} did not finish in {timeout}s; stderr: {err.decode(errors='replace')}")
        res = subprocess.CompletedProcess(list(argv), p.returncode, out.decode(errors="replace"),
                                          err.decode(errors="replace"))
        if check and p.returncode != 0:
            raise NetLabError(f"{argv!r} exited {p.returncode}: {res.stderr.strip()}")
        return res

    def run_in_server(self, argv: Sequence[str], **popen_kw) -> subprocess.Popen:
        return self._popen_in(self.server_ns, argv, resolv=False, **popen_kw)

    def python_in_agent(self, code: str, *args: str, cgroup=None, timeout: float = 60, check: bool = False):
        """Run a Python snippet (with this interpreter, so dnspython/paramiko are importable);
        ``args`` become sys.argv[1:]."""
        return self.check_in_agent([sys.executable, "-c", code, *args], cgroup=cgroup, timeout=timeout, check=check)

    # -- servers ---------------------------------------------------------------------------------
    def _start_servers(self) -> None:
        cfg = {
            "records": self.records,
            "records6": self.records6,
            "ttl": DNS_TTL,
            "ttls": self.ttls,
            "dns": [DNS_HOST, DNS_PORT],
            "stratum": [[POOL_HOST, p] for p in POOL_PORTS] + [[POOL_HOST6, 3333]],
            "http": [[WEB_HOST, HTTP_PORT], [INTERNAL_HOST, HTTP_PORT]],
            "http_root": str(self.http_root),
            "log": str(self.server_log_path),
        }
        p = self.run_in_server([sys.executable, os.path.abspath(__file__), "--serve", json.dumps(cfg)],
                               stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.servers_proc = p
        line = p.stdout.readline()  # the helper prints READY after every socket is bound
        if line.strip() != b"READY":
            p.wait(timeout=5)
            raise NetLabError(f"lab servers failed to start (exit {p.returncode}): {line!r}")

    def _start_sshd(self) -> None:
        d = self._d
        for key, comment in ((self.host_key, "netlab-host"), (self.user_key, "netlab-user")):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                           check=True, stdin=subprocess.DEVNULL)
        shutil.copyfile(f"{self.user_key}.pub", d / "authorized_keys")
        os.chmod(d / "authorized_keys", 0o600)
        # sshd's privilege-separation chroot; left in place afterwards because a system sshd or a
        # concurrent lab may rely on it too.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        listen = ([f"ListenAddress {SSH_HOST}:{p}" for p in SSH_PORTS] + [f"ListenAddress {INTERNAL_HOST}:22"]
                  + [f"ListenAddress [{SSH_HOST6}]:{p}" for p in SSH_PORTS] + [f"ListenAddress [{INTERNAL_HOST6}]:22"])
        cfg = "\n".join([
            *(f"Port {p}" for p in SSH_PORTS),
            *listen,
            f"HostKey {self.host_key}",
            f"PidFile {d / 'sshd.pid'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # The temp dir lives under /tmp (world-writable), which StrictModes would reject.
            "StrictModes no",
            "AllowTcpForwarding yes",
            "GatewayPorts yes",
            "PermitTunnel no",
            "X11Forwarding no",
            "PrintMotd no",
            "LogLevel VERBOSE",
            "Subsystem sftp internal-sftp",
            "",
        ])
        (d / "sshd_config").write_text(cfg)
        subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(d / "sshd_config")], check=True)
        self.sshd_proc = self.run_in_server(
            ["/usr/sbin/sshd", "-D", "-f", str(d / "sshd_config"), "-E", str(self.sshd_log_path)],
            stdin=subprocess.DEVNULL)
        want = ({(SSH_HOST, p) for p in SSH_PORTS} | {(INTERNAL_HOST, 22)}
                | {(SSH_HOST6, p) for p in SSH_PORTS} | {(INTERNAL_HOST6, 22)})
        # Startup wait, not an assertion: sshd binds within milliseconds; the bound keeps a broken
        # sshd from hanging the suite.
        deadline = time.monotonic() + 20
        while not want <= listening_tcp(self.sshd_proc.pid):
            if self.sshd_proc.poll() is not None:
                raise NetLabError(f"sshd exited {self.sshd_proc.returncode}: {self.sshd_log()}")
            if time.monotonic() > deadline:
                raise NetLabError(f"sshd did not bind {sorted(want)}: {self.sshd_log()}")
            time.sleep(0.02)

    # -- observation -----------------------------------------------------------------------------
    def sshd_log(self) -> str:
        try:
            return self.sshd_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def server_events(self, kind: str | None = None) -> list[dict]:
        """What the Python servers received: {"kind": "stratum"|"dns"|"http", ...} per line."""
        try:
            lines = self.server_log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        evs = [json.loads(l) for l in lines if l.strip()]
        return [e for e in evs if kind is None or e.get("kind") == kind]

    def server_listening(self) -> set[tuple[str, int]]:
        return listening_tcp(self.servers_proc.pid)

    def server_port_open(self, addr: str, port: int) -> bool:
        """Whether something listens on addr:port inside the server netns (wildcard binds count),
        e.g. the port an ``ssh -R 9000:...`` tunnel asks sshd to open."""
        for a, p in self.server_listening():
            if p == port and a in (addr, "0.0.0.0", "::"):
                return True
        return False

    def wait_server_port(self, addr: str, port: int, timeout: float = 20, proc: subprocess.Popen | None = None) -> bool:
        """Poll until addr:port listens in the server netns; False after ``timeout`` or when ``proc``
        (e.g. the ssh client) exits first. For readiness only; assert on the returned value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server_port_open(addr, port):
                return True
            if proc is not None and proc.poll() is not None:
                return self.server_port_open(addr, port)
            time.sleep(0.05)
        return False

    def ssh_argv(self, host: str = SSH_HOST, port: int = 22, *extra: str, command: Sequence[str] = (),
                 binary: str = "ssh", user: str = "root") -> list[str]:
        """An ssh command line that logs in to a lab sshd with the lab key and no user config."""
        return [binary, "-F", "none", "-i", str(self.user_key), "-p", str(port),
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10", "-o", "ExitOnForwardFailure=yes",
                *extra, f"{user}@{host}", *command]

    def make_git_repo(self, name: str = "repo.git") -> str:
        """A bare git repository with one commit under http_root, prepared for dumb-HTTP cloning.
        Returns the clone URL on the internal host."""
        work = self._d / f"work-{name}"
        env = {**os.environ, "GIT_AUTHOR_NAME": "lab", "GIT_AUTHOR_EMAIL": "lab@example.org",
               "GIT_COMMITTER_NAME": "lab", "GIT_COMMITTER_EMAIL": "lab@example.org", "HOME": str(self._d)}
        subprocess.run(["git", "init", "-q", str(work)], check=True, env=env)
        (work / "README").write_text("netlab repository\n")
        subprocess.run(["git", "-C", str(work), "add", "README"], check=True, env=env)
        subprocess.run(["git", "-C", str(work), "commit", "-q", "-m", "init"], check=True, env=env)
        bare = self.http_root / name
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, env=env)
        subprocess.run(["git", "-C", str(bare), "update-server-info"], check=True, env=env)
        return f"http://{INTERNAL_HOST}/{name}"


# -- the Python servers (this file run with --serve inside the server netns) -------------------

_log_lock = threading.Lock()


def _log(path: str, rec: dict) -> None:
    with _log_lock, open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _stratum_reply(msg: dict, peer, port: int) -> list[dict]:
    """Replies a real pool gives: Bitcoin-style stratum (mining.*) and Monero-style (login)."""
    mid = msg.get("id")
    method = msg.get("method")
    if method == "mining.subscribe":
        return [{"id": mid, "result": [[["mining.set_difficulty", "b4b6693b72a50c7116db18d6497cac52"],
                                        ["mining.notify", "ae6812eb4cd7735a302a8a9dd95cf71f"]],
                                       "08000002", 4], "error": None}]
    if method == "mining.authorize":
        return [{"id": mid, "result": True, "error": None},
                {"id": None, "method": "mining.set_difficulty", "params": [2]},
                {"id": None, "method": "mining.notify",
                 "params": ["bf", "4d16b6f85af6e2198f44ae2a6de67f78487ae5611b77c6c0440b921e00000000",
                            "01000000010000000000000000000000000000000000000000000000000000000000000000ffffffff20020862062f503253482f04b8864e5008",
                            "072f736c7573682f000000000100f2052a010000001976a914d23fcdf86f7e756a64a7a9688ef9903327048ed988ac00000000",
                            [], "00000002", "1c2ac4af", "504e86b9", False]}]
    if method == "mining.extranonce.subscribe":
        return [{"id": mid, "result": True, "error": None}]
    if method == "mining.submit":
        return [{"id": mid, "result": True, "error": None}]
    if method == "login":
        return [{"id": mid, "jsonrpc": "2.0", "error": None, "result": {
            "id": "netlab-worker-1",
            "job": {"blob": "0e0ed7b8e7d0" + "00" * 70, "job_id": "netlab-job-1", "target": "b88d0600",
                    "algo": "rx/0", "height": 3000000, "seed_hash": "00" * 32},
            "extensions": ["algo", "nicehash", "connect", "tls", "keepalive"], "status": "OK"}}]
    if method == "keepalived":
        return [{"id": mid, "jsonrpc": "2.0", "error": None, "result": {"status": "KEEPALIVED"}}]
    if method == "submit":
        return [{"id": mid, "jsonrpc": "2.0", "error": None, "result": {"status": "OK"}}]
    return [{"id": mid, "result": None, "error": [20, f"unknown method {method!r}", None]}]


def _serve_stratum(addr: str, port: int, log: str) -> socket.socket:
    srv = socket.create_server((addr, port), family=socket.AF_INET6 if ":" in addr else socket.AF_INET)

    def handle(conn: socket.socket, peer) -> None:
        with conn, conn.makefile("rwb") as f:
            for raw in f:
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                try:
                    msg = json.loads(line)
                except ValueError:
                    _log(log, {"kind": "stratum", "port": port, "peer": peer[0], "peer_port": peer[1], "raw": line, "error": "bad json"})
                    return
                _log(log, {"kind": "stratum", "port": port, "peer": peer[0], "peer_port": peer[1], "method": msg.get("method"),
                           "params": msg.get("params")})
                for rep in _stratum_reply(msg, peer, port):
                    f.write((json.dumps(rep) + "\n").encode())
                f.flush()

    def loop() -> None:
        while True:
            conn, peer = srv.accept()
            threading.Thread(target=handle, args=(conn, peer), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def _is_addr(v: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return False


def _dns_answer(wire: bytes, records: Mapping[str, str], ttl: int, log: str, peer, proto: str,
                records6: Mapping[str, str] = {}, ttls: Mapping[str, int] = {}) -> bytes | None:
    import dns.flags
    import dns.message
    import dns.name
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset

    try:
        q = dns.message.from_wire(wire)
    except Exception as e:  # a malformed query gets no answer, as from a real resolver
        _log(log, {"kind": "dns", "proto": proto, "peer": peer[0], "error": str(e)})
        return None
    resp = dns.message.make_response(q)
    resp.flags |= dns.flags.RA
    for rr in q.question:
        name = rr.name.to_text(omit_final_dot=True).lower()
        # The raw query is kept so tests can parse what a real resolver library sent.
        _log(log, {"kind": "dns", "proto": proto, "peer": peer[0], "query": name,
                   "qtype": dns.rdatatype.to_text(rr.rdtype), "wire": wire.hex()})
        if name not in records and name not in records6:
            resp.set_rcode(dns.rcode.NXDOMAIN)
            continue
        owner = rr.name
        hops = 0
        while name in records and not _is_addr(records[name].split(",")[0]) and hops < 8:
            # a record that names another name is a CNAME: answer the chain, as a resolver does
            target = records[name].lower().rstrip(".")
            resp.answer.append(dns.rrset.from_text(owner, ttls.get(name, ttl), dns.rdataclass.IN,
                                                   dns.rdatatype.CNAME, target + "."))
            owner, name, hops = dns.name.from_text(target), target, hops + 1
        if name not in records and name not in records6:
            continue
        ttl_n = ttls.get(name, ttl)
        if rr.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and name in records:
            resp.answer.append(dns.rrset.from_text(owner, ttl_n, dns.rdataclass.IN, dns.rdatatype.A,
                                                   *records[name].split(",")))
        if rr.rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY) and name in records6:
            resp.answer.append(dns.rrset.from_text(owner, ttl_n, dns.rdataclass.IN, dns.rdatatype.AAAA, records6[name]))
        # Other types of a known name: NOERROR with no data, like a real authoritative answer.
    return resp.to_wire()


def _serve_dns(addr: str, port: int, records, ttl: int, log: str, records6=None, ttls=None) -> None:
    records6 = records6 or {}
    ttls = ttls or {}
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((addr, port))
    tcp = socket.create_server((addr, port))

    def udp_loop() -> None:
        while True:
            data, peer = udp.recvfrom(4096)
            out = _dns_answer(data, records, ttl, log, peer, "udp", records6, ttls)
            if out is not None:
                udp.sendto(out, peer)

    def tcp_conn(conn: socket.socket, peer) -> None:
        with conn:
            while True:
                hdr = _recv_exact(conn, 2)
                if hdr is None:
                    return
                data = _recv_exact(conn, int.from_bytes(hdr, "big"))
                if data is None:
                    return
                out = _dns_answer(data, records, ttl, log, peer, "tcp", records6, ttls)
                if out is None:
                    return
                conn.sendall(len(out).to_bytes(2, "big") + out)

    def tcp_loop() -> None:
        while True:
            conn, peer = tcp.accept()
            threading.Thread(target=tcp_conn, args=(conn, peer), daemon=True).start()

    threading.Thread(target=udp_loop, daemon=True).start()
    threading.Thread(target=tcp_loop, daemon=True).start()


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def _serve_http(addr: str, port: int, root: str, log: str) -> None:
    import functools
    import http.server

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            _log(log, {"kind": "http", "peer": self.client_address[0], "host": self.headers.get("Host"),
                       "request": self.requestline})

    srv = http.server.ThreadingHTTPServer((addr, port), functools.partial(Handler, directory=root))
    threading.Thread(target=srv.serve_forever, daemon=True).start()


def _serve_main(cfg: dict) -> None:
    log = cfg["log"]
    for addr, port in cfg["stratum"]:
        _serve_stratum(addr, port, log)
    _serve_dns(cfg["dns"][0], cfg["dns"][1], cfg["records"], cfg["ttl"], log, cfg["records6"], cfg.get("ttls"))
    for addr, port in cfg["http"]:
        _serve_http(addr, port, cfg["http_root"], log)
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def lab_requirements() -> str | None:
    """Why the lab cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not os.path.exists("/usr/sbin/sshd"):
        return "needs /usr/sbin/sshd (Debian openssh-server)"
    return None


_require = lab_requirements


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        _serve_main(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: netlab.py --serve CONFIG_JSON (started by NetLab)")

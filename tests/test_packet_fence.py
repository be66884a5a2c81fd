"""Packet sockets (and other families cgroup/sock_create never sees) from agents:
`run -- CMD` in enforce mode takes CAP_NET_RAW away (the kernel answers EPERM itself), and the
optional `packet` probe (socket() syscall tracepoints over the same `sock_fence` map) reports
them in monitor mode and kills the process in enforce mode. Real probes, real cgroups."""
import errno
import json
import signal
import socket
import subprocess
import sys

import pytest

from conftest import AGENTTRACE, AgentTree, ListSink, need_bpf
from harness import wait_until

PY = sys.executable

PACKETS = """
import json, socket
out = {}
for name, fam, typ in [("packet", socket.AF_PACKET, socket.SOCK_RAW),
                       ("packet_dgram", socket.AF_PACKET, socket.SOCK_DGRAM),
                       ("raw4", socket.AF_INET, socket.SOCK_RAW),
                       ("tcp", socket.AF_INET, socket.SOCK_STREAM)]:
    try:
        socket.socket(fam, typ, socket.IPPROTO_ICMP if name == "raw4" else 0).close()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
out["capbnd"] = int(open("/proc/self/status").read().split("CapBnd:")[1].split()[0], 16)
print(json.dumps(out), flush=True)
"""
CAP_NET_RAW_BIT = 1 << 13


def _cli(tmp_path, *args, timeout=120):
    out = tmp_path / "ev.jsonl"
    p = subprocess.run([AGENTTRACE, "run", "-o", str(out), *args], capture_output=True, text=True,
                       timeout=timeout)
    recs = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return p, recs


def _started(recs):
    return [r for r in recs if r["kind"] == "lifecycle" and r["phase"] == "started"][0]


def _fence_alerts(recs):
    return [r for r in recs if r["kind"] == "alert" and r["rule"]["id"] == "escape-socket-fence"]


# ---------------------------------------------------------------- step 1: the capability drop

def test_run_enforce_drops_cap_net_raw_so_the_kernel_refuses_packet_sockets(tmp_path):
    need_bpf()
    p, recs = _cli(tmp_path, "--mode", "enforce", "--", PY, "-c", PACKETS)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["packet"] == out["packet_dgram"] == out["raw4"] == errno.EPERM
    assert out["tcp"] == 0
    assert not out["capbnd"] & CAP_NET_RAW_BIT
    st = _started(recs)
    # the fence's capability first, then what a root agent could turn on the tracer (test_tamper_caps)
    assert st["capabilities_dropped"][0] == "CAP_NET_RAW" and "CAP_SYS_ADMIN" in st["capabilities_dropped"]
    # packet is in the default fence; without the `packet` probe only the dropped capability holds it
    assert st["socket_fence"] == {"entries": ["inet:raw", "inet6:raw", "packet"], "unseen": [], "scan_s": 2.0}
    assert "packet" not in st["probes"]


def test_run_monitor_keeps_capabilities_and_the_packet_probe_reports(tmp_path):
    need_bpf()
    p, recs = _cli(tmp_path, "--mode", "monitor", "--packet", "--", PY, "-c", PACKETS)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["packet"] == out["packet_dgram"] == out["raw4"] == 0
    assert out["capbnd"] & CAP_NET_RAW_BIT
    st = _started(recs)
    assert st["capabilities_dropped"] == [] and "packet" in st["probes"]
    al = _fence_alerts(recs)
    pkt = [a for a in al if a["socket"]["family"] == "packet"]
    assert sorted(a["socket"]["type"] for a in pkt) == ["dgram", "raw"]
    execs = [r for r in recs if r["kind"] == "exec" and r["proc"]["exe"].endswith(PY.rsplit("/", 1)[-1])]
    for a in pkt:
        assert a["rule"]["outcome"] == "reported"
        assert a["socket"] == {**a["socket"], "verdict": "allowed", "hook": "sys_socket", "fenced": True}
        assert a["proc"]["pid"] in {e["proc"]["pid"] for e in execs}


def test_run_enforce_without_the_drop_kills_at_socket_return(tmp_path):
    """--drop-caps none (the opt-out) leaves the packet probe to act: SIGKILL, outcome killed;
    the raw inet socket is still refused by cgroup/sock_create."""
    need_bpf()
    p, recs = _cli(tmp_path, "--mode", "enforce", "--packet", "--drop-caps", "none", "--",
                   PY, "-c", PACKETS)
    assert p.returncode == 128 + signal.SIGKILL, (p.returncode, p.stdout, p.stderr)
    assert p.stdout.strip() == ""        # died at its first packet socket, before printing
    st = _started(recs)
    assert st["capabilities_dropped"] == []
    al = _fence_alerts(recs)
    assert [a["socket"]["verdict"] for a in al] == ["killed"]
    assert al[0]["rule"]["outcome"] == "killed" and al[0]["socket"]["family"] == "packet"


def test_raw_inet_refused_before_sock_create_is_still_reported(tmp_path):
    """With CAP_NET_RAW gone a raw inet socket fails in inet_create before cgroup/sock_create
    runs; the packet probe's sys_exit sees the EPERM and reports it as blocked."""
    need_bpf()
    code = "import socket\ntry:\n    socket.socket(socket.AF_INET, socket.SOCK_RAW, 1)\nexcept PermissionError:\n    print('eperm')"
    p, recs = _cli(tmp_path, "--mode", "enforce", "--packet", "--no-net", "--", PY, "-c", code)
    assert p.returncode == 0 and p.stdout.strip() == "eperm", p.stderr
    al = _fence_alerts(recs)
    assert len(al) == 1
    assert al[0]["socket"] == {"family": "inet", "type": "raw", "protocol": "icmp", "verdict": "blocked",
                               "fenced": True, "hook": "sys_socket", "error": "EPERM"}
    assert al[0]["rule"]["outcome"] == "blocked"


def test_drop_caps_input_is_checked(tmp_path):
    p = subprocess.run([AGENTTRACE, "run", "--drop-caps", "net_rawr", "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown capability 'net_rawr'" in p.stderr
    p = subprocess.run([AGENTTRACE, "run", "--drop-caps", "none", "--cgroup", "/x"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--drop-caps applies to -- CMD only" in p.stderr


def test_caps_follow_the_fence():
    from agenttrace.kernel.sockfence import parse_fence
    from agenttrace.session.capdrop import CAP_NET_RAW, caps_for_fence, parse_caps
    assert caps_for_fence([parse_fence("packet")]) == [CAP_NET_RAW]
    assert caps_for_fence([parse_fence("inet6:raw")]) == [CAP_NET_RAW]
    assert caps_for_fence([parse_fence("inet")]) == [CAP_NET_RAW]
    # ping sockets, netlink and vsock need no capability: dropping one would not refuse them
    assert caps_for_fence([parse_fence("inet:dgram:icmp"), parse_fence("netlink"), parse_fence("vsock")]) == []
    assert parse_caps("CAP_NET_RAW, net_admin") == [13, 12]
    assert parse_caps("none") == []


def test_daemon_config_selects_the_packet_probe_and_the_scan():
    from agenttrace.config import ConfigError, parse_config
    from agenttrace.session.options import from_config
    opts = from_config(parse_config("probes: {packet: true, packet_scan_s: 0}\nsocket_fence: [packet, 'netlink:raw:9']\n"))
    assert "packet" in opts.features and "sock" in opts.features and opts.packet_scan_s == 0
    assert [(e.family, e.protocol) for e in opts.sock_fence] == [(socket.AF_PACKET, 0xFFFF), (socket.AF_NETLINK, 9)]
    assert from_config(parse_config("")).packet_scan_s == 2.0 and "packet" not in from_config(parse_config("")).features
    with pytest.raises(ConfigError, match="packet_scan_s"):
        parse_config("probes: {packet_scan_s: -1}\n")


def test_fence_specs_of_other_families():
    from agenttrace.kernel.sockfence import ANY, FenceError, parse_fence, spec_of, unseen
    e = parse_fence("packet")
    assert (e.family, e.type, e.protocol) == (socket.AF_PACKET, ANY, ANY)
    assert parse_fence("netlink:raw:0").protocol == 0
    assert parse_fence("packet:dgram:768").protocol == 768     # htons(ETH_P_ALL)
    assert parse_fence("40").family == socket.AF_VSOCK
    assert spec_of(parse_fence("netlink:any:9")) == "netlink:any:9"
    with pytest.raises(FenceError, match="unknown family 'bogus'"):
        parse_fence("bogus")
    with pytest.raises(FenceError, match="unknown protocol"):
        parse_fence("netlink:raw:route")
    fence = [parse_fence(s) for s in ("inet:raw", "packet", "vsock")]
    assert unseen(fence, ("sock",)) == ["packet", "vsock"]
    assert unseen(fence, ("sock",), dropped_caps=[13]) == ["vsock"]
    assert unseen(fence, ("sock", "packet")) == []


# ------------------------------------------------- step 2: the packet probe in agent cgroups

OPEN = "import socket, sys; socket.socket(int(sys.argv[1]), int(sys.argv[2]), 0).close(); print('made')"
FENCE = ("inet:raw", "inet6:raw", "packet", "vsock")


@pytest.fixture(scope="module")
def packet_session():
    """One tracer (proc + sock + packet) over one agent tree for every case; the mode is
    switched between cases (Tracer.set_mode: kernel flag and engine together)."""
    need_bpf()
    from agenttrace.enrich.cgroups import cgroup2_mount
    from agenttrace.kernel.sockfence import parse_fence
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    from agenttrace.session.pipeline import Options, Tracer
    from conftest import Session
    tree = AgentTree(cgroup2_mount())
    sink = ListSink()
    tracer = None
    try:
        tracer = Tracer(Options(cgroups=[tree.root], features=("proc", "sock", "packet"),
                                sock_fence=[parse_fence(s) for s in FENCE]),
                        [sink], engine=Engine(load_rules(default_rule_paths()), mode="monitor"))
        tracer.start()
        yield tree, Session(tracer, sink)
    finally:
        if tracer is not None:
            tracer.stop()
        tree.cleanup()


def _open_in(tree, cg, fam, typ=socket.SOCK_RAW):
    return tree.run(cg, [PY, "-c", OPEN, str(int(fam)), str(int(typ))])


def _socket_alerts(sess, pid):
    return [a for a in sess.of("alert") if a["rule"]["id"] == "escape-socket-fence" and a["proc"]["pid"] == pid]


@pytest.mark.parametrize("mode", ["monitor", "enforce"])
def test_packet_socket_in_an_agent_cgroup(mode, packet_session):
    tree, sess = packet_session
    sess.tracer.set_mode(mode)
    a = tree.agent(f"pkt-{mode}")
    p = tree.spawn(a, [PY, "-c", OPEN, str(int(socket.AF_PACKET)), str(int(socket.SOCK_RAW))],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, _err = p.communicate(timeout=60)
    al = sess.wait_for(lambda: _socket_alerts(sess, p.pid))
    assert len(al) == 1
    assert al[0]["socket"]["family"] == "packet" and al[0]["socket"]["hook"] == "sys_socket"
    assert al[0]["agent"]["cgroup"].endswith(f"/pkt-{mode}")
    if mode == "enforce":
        assert p.returncode == -signal.SIGKILL and out == b""
        assert al[0]["socket"]["verdict"] == "killed" and al[0]["rule"]["outcome"] == "killed"
    else:
        assert p.returncode == 0 and out.strip() == b"made"
        assert al[0]["socket"]["verdict"] == "allowed" and al[0]["rule"]["outcome"] == "reported"


def test_other_families_follow_the_configured_list(packet_session):
    tree, sess = packet_session
    sess.tracer.set_mode("enforce")
    a = tree.agent("families")
    vs = tree.spawn(a, [PY, "-c", OPEN, str(int(socket.AF_VSOCK)), str(int(socket.SOCK_STREAM))],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    vs.communicate(timeout=60)
    nl = _open_in(tree, a, socket.AF_NETLINK)          # not in the fence: untouched, unreported
    ux = _open_in(tree, a, socket.AF_UNIX, socket.SOCK_STREAM)
    assert nl.returncode == 0 and ux.returncode == 0
    al = sess.wait_for(lambda: _socket_alerts(sess, vs.pid))
    assert al and al[0]["socket"]["family"] == "vsock"
    # vsock is listed: killed where the socket was made, blocked (not killed) where the kernel refused it
    if vs.returncode == -signal.SIGKILL:
        assert al[0]["socket"]["verdict"] == "killed"
    else:
        assert al[0]["socket"]["verdict"] == "blocked" and "error" in al[0]["socket"]
    sess.settle()
    fams = {r["socket"]["family"] for r in sess.of("socket")}
    assert "netlink" not in fams and "unix" not in fams


def test_a_process_outside_agent_cgroups_is_unaffected(packet_session, cgroup2_root):
    import uuid
    from conftest import _kill_and_rmdir
    tree, sess = packet_session
    sess.tracer.set_mode("enforce")
    outside = cgroup2_root / f"agenttrace-outside-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    try:
        before = len(sess.of("socket"))
        res = _open_in(tree, outside, socket.AF_PACKET)
        assert res.returncode == 0 and res.stdout.strip() == b"made"
        socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0).close()     # the test itself
        sess.settle()
        assert len(sess.of("socket")) == before
    finally:
        _kill_and_rmdir(outside)


def test_run_cgroup_enforce_kills_a_packet_socket_of_an_agent(agent_tree, tmp_path):
    """`agenttrace run --cgroup ROOT --mode enforce --packet` as a user starts it: an agent
    process that makes a packet socket dies on return from socket(); the alert names it."""
    import time
    out = tmp_path / "ev.jsonl"
    a = agent_tree.agent("cg-pkt")
    p = subprocess.Popen([AGENTTRACE, "run", "--cgroup", str(agent_tree.root), "--mode", "enforce",
                          "--packet", "--no-net", "--gpu", "off", "--output", str(out)],
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not (out.exists() and b'"started"' in out.read_bytes()):
            assert p.poll() is None, p.stderr.read().decode()
            time.sleep(0.1)
        child = agent_tree.spawn(a, [PY, "-c", OPEN, str(int(socket.AF_PACKET)), str(int(socket.SOCK_DGRAM))],
                                 stdout=subprocess.PIPE)
        assert child.communicate(timeout=60)[0] == b"" and child.returncode == -signal.SIGKILL
        al = []
        while time.monotonic() < deadline and not al:
            time.sleep(0.1)
            al = [r for r in map(json.loads, out.read_text().splitlines())
                  if r["kind"] == "alert" and r["rule"]["id"] == "escape-socket-fence"]
        assert al and al[0]["proc"]["pid"] == child.pid and al[0]["agent"]["id"] == "cg-pkt"
        assert al[0]["rule"]["outcome"] == "killed" and al[0]["socket"]["type"] == "dgram"
    finally:
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 0


# ------------------------------------- step 3: the scan while the packet probe is off

HOLD = """
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
print("ready", flush=True)
sys.stdin.readline()
"""


def test_scan_reports_a_held_packet_socket_once_and_counts_what_it_cannot_map(agent_tree, make_session):
    from agenttrace.kernel.sockfence import default_entries
    sess = make_session([agent_tree.root], features=("proc", "sock"), sock_fence=default_entries(),
                        packet_scan_s=0.5, engine=_monitor_engine())
    assert sess.tracer.packet_scan is not None
    mine = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)     # outside agents: unmapped
    a = agent_tree.agent("held")
    p = agent_tree.spawn(a, [PY, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        al = sess.wait_for(lambda: _socket_alerts(sess, p.pid))
        assert al[0]["socket"]["hook"] == "scan" and al[0]["socket"]["type"] == "dgram"
        assert al[0]["agent"]["id"] == "held" and al[0]["rule"]["outcome"] == "reported"
        scans = sess.tracer.packet_scan.stats["scans"]
        sess.wait_for(lambda: sess.tracer.packet_scan.stats["scans"] >= scans + 2)
        assert len(_socket_alerts(sess, p.pid)) == 1          # once per socket
        st = sess.tracer.counters()["packet_scan"]
        assert st["sockets"] == 1 and st["unmapped"] >= 1    # the test's own socket, counted once
    finally:
        mine.close()
        p.stdin.close()
        p.wait(timeout=30)


def test_scan_beside_the_packet_probe_does_not_report_a_socket_twice(agent_tree, make_session):
    """With the probe loaded the scan is the backstop for what socket() tracepoints miss: a
    socket the probe already reported is not reported again by the scan (one record)."""
    from agenttrace.kernel.sockfence import default_entries
    sess = make_session([agent_tree.root], features=("proc", "sock", "packet"), sock_fence=default_entries(),
                        packet_scan_s=0.5, engine=_monitor_engine())
    assert sess.tracer.packet_scan is not None
    a = agent_tree.agent("held-probe")
    p = agent_tree.spawn(a, [PY, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        assert sess.wait_for(lambda: [r for r in sess.of("socket") if r["proc"]["pid"] == p.pid])
        scans = sess.tracer.packet_scan.stats["scans"]
        sess.wait_for(lambda: sess.tracer.packet_scan.stats["scans"] >= scans + 3)
        recs = [r for r in sess.of("socket") if r["proc"]["pid"] == p.pid]
        assert [r["socket"]["hook"] for r in recs] == ["sys_socket"], recs
    finally:
        p.stdin.close()
        p.wait(timeout=30)


def _monitor_engine():
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    return Engine(load_rules(default_rule_paths()), mode="monitor")


I32_SOCKET = r"""
#include <stdio.h>
/* socket(AF_PACKET, SOCK_RAW, 0) through the ia32 entry: int 0x80, ia32 __NR_socket = 359 */
int main(void) { long ret; __asm__ volatile("int $0x80" : "=a"(ret) : "a"(359L), "b"(17L), "c"(3L), "d"(0L) : "memory"); printf("%ld\n", ret); return 0; }
"""


def test_ia32_socket_evades_the_tracepoint_but_not_the_capability_drop(tmp_path):
    """Why step 1 exists: a compat syscall never reaches syscalls:sys_enter_socket (the kernel
    ignores compat syscalls in syscall tracepoints), so the `packet` probe neither sees nor
    kills it; without CAP_NET_RAW the kernel refuses it all the same."""
    need_bpf()
    import os
    import platform
    import shutil
    if platform.machine() != "x86_64" or not shutil.which("gcc"):
        pytest.skip("needs x86_64 and gcc (the ia32 entry from a 64-bit process)")
    exe = tmp_path / "i32sock"
    subprocess.run(["gcc", "-O1", "-o", str(exe), "-x", "c", "-"], input=I32_SOCKET.encode(), check=True)
    here = subprocess.run([str(exe)], capture_output=True, text=True).stdout.strip()
    if here == str(-errno.ENOSYS):
        pytest.skip("ia32 emulation is off on this kernel")
    p, recs = _cli(tmp_path, "--mode", "enforce", "--no-net", "--", str(exe))
    assert p.returncode == 0 and p.stdout.strip() == str(-errno.EPERM), (p.stdout, p.stderr)
    os.unlink(tmp_path / "ev.jsonl")
    p, recs = _cli(tmp_path, "--mode", "enforce", "--packet", "--drop-caps", "none", "--no-net", "--", str(exe))
    assert p.returncode == 0 and int(p.stdout.strip()) >= 0        # made, and not killed
    # the tracepoint never saw it; the userspace scan may (the socket lives until exit, and a
    # scan that lands in that window reports it with hook "scan": what the scan is for)
    socks = [r["socket"] for r in recs if r["kind"] == "socket"]
    assert all(s.get("hook") == "scan" for s in socks), socks


URING_SOCKET = r"""
/* socket(FAMILY, TYPE, PROTO) as io_uring IORING_OP_SOCKET, no syscall socket(): prints the
 * completion's result (fd or -errno); with "hold", keeps the socket open until stdin closes.
 * usage: uring_socket FAMILY TYPE PROTO [hold] */
#include <linux/io_uring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    int fd = syscall(__NR_io_uring_setup, 4, &p);
    if (fd < 0) { perror("io_uring_setup"); return 2; }
    size_t sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(0, sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    char *cq = mmap(0, cq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
    struct io_uring_sqe *sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                                     MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) { perror("mmap"); return 2; }
    unsigned *tail = (unsigned *)(sq + p.sq_off.tail), *mask = (unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *array = (unsigned *)(sq + p.sq_off.array);
    unsigned t = *tail, i = t & *mask;
    struct io_uring_sqe *e = &sqes[i];
    memset(e, 0, sizeof(*e));
    e->opcode = IORING_OP_SOCKET;
    e->fd = atoi(argv[1]);          /* domain */
    e->off = atoi(argv[2]);         /* type */
    e->len = atoi(argv[3]);         /* protocol */
    array[i] = i;
    __atomic_store_n(tail, t + 1, __ATOMIC_RELEASE);
    if (syscall(__NR_io_uring_enter, fd, 1, 1, IORING_ENTER_GETEVENTS, 0, 0) < 0) { perror("io_uring_enter"); return 2; }
    unsigned *chead = (unsigned *)(cq + p.cq_off.head), *cmask = (unsigned *)(cq + p.cq_off.ring_mask);
    struct io_uring_cqe *cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    int res = cqes[*chead & *cmask].res;
    printf("%d\n", res);
    fflush(stdout);
    if (argc > 4 && res >= 0) { char b[8]; while (read(0, b, sizeof b) > 0) ; }
    return 0;
}
"""


@pytest.fixture(scope="module")
def uring_socket(tmp_path_factory):
    """A program that makes a socket with io_uring's IORING_OP_SOCKET, never calling socket(2)."""
    d = tmp_path_factory.mktemp("uring")
    subprocess.run(["gcc", "-O1", "-o", str(d / "uring_socket"), "-x", "c", "-"], input=URING_SOCKET.encode(),
                   check=True)
    here = subprocess.run([str(d / "uring_socket"), "2", "2", "0"], capture_output=True, text=True)
    if here.returncode != 0 or int(here.stdout) < 0:
        pytest.skip(f"io_uring sockets unavailable here: {here.stdout.strip()} {here.stderr.strip()}")
    return d / "uring_socket"


def test_io_uring_socket_is_refused_by_the_capability_drop(tmp_path, uring_socket):
    """run -- CMD in enforce mode: no syscall tracepoint sees IORING_OP_SOCKET, but without
    CAP_NET_RAW the kernel refuses packet and raw sockets on that path too."""
    need_bpf()
    for fam, typ, proto in ((socket.AF_PACKET, socket.SOCK_DGRAM, 0), (socket.AF_INET, socket.SOCK_RAW, 1)):
        p, _ = _cli(tmp_path, "--mode", "enforce", "--no-net", "--", str(uring_socket), str(fam), str(typ), str(proto))
        assert p.returncode == 0 and p.stdout.strip() == str(-errno.EPERM), (fam, p.stdout, p.stderr)
        (tmp_path / "ev.jsonl").unlink()


@pytest.mark.parametrize("mode", ["monitor", "enforce"])
def test_io_uring_packet_socket_of_a_cgroup_agent_is_found_by_the_scan(mode, agent_tree, tmp_path, uring_socket):
    """`run --cgroup` with the `packet` probe on: IORING_OP_SOCKET passes the socket() tracepoints,
    so the scan, which runs with the probe too, is what finds it; enforce mode kills the holder."""
    need_bpf()
    out = tmp_path / "ev.jsonl"
    rel = "/" + str(agent_tree.root.relative_to(agent_tree.root.parent))
    t = subprocess.Popen([AGENTTRACE, "run", "--cgroup", rel, "--mode", mode, "--packet", "--no-net", "-o", str(out)],
                         stderr=subprocess.PIPE)
    holder = None
    try:
        assert wait_until(lambda: out.exists() and '"phase":"started"' in out.read_text(), 60), t.stderr
        a = agent_tree.agent("uring")
        holder = agent_tree.spawn(a, [str(uring_socket), str(socket.AF_PACKET), str(socket.SOCK_RAW), "0", "hold"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert int(holder.stdout.readline()) >= 0          # made: the probe did not see it
        def alert():
            recs = [json.loads(line) for line in out.read_text().splitlines()]
            return [r for r in _fence_alerts(recs) if r["proc"]["pid"] == holder.pid and r["rule"]["outcome"] != "pending"]
        al = wait_until(alert, 30)
        assert al and al[0]["socket"]["hook"] == "scan" and al[0]["socket"]["family"] == "packet"
        if mode == "enforce":
            assert al[0]["rule"]["outcome"] == "killed"
            assert holder.wait(timeout=30) == -signal.SIGKILL
        else:
            assert al[0]["rule"]["outcome"] == "reported" and holder.poll() is None
    finally:
        if holder is not None and holder.poll() is None:
            holder.stdin.close()
            holder.wait(timeout=30)
        t.send_signal(signal.SIGINT)
        t.wait(timeout=60)

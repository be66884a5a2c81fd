"""probes/flow.c reassembly: the protocol of a flow is decided from its first bytes however the
sender cuts, pads or prefixes them — a banner sent one byte at a time, a stratum login after
blanks, an SSH banner after other lines. Real clients in the netlab against the lab's servers;
the pool stub (tracer/lab/netlab.py (fixtures: tests/netlab.py)) records every line it receives, so "the far side never saw it"
is read from the far side itself."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import orjson
import pytest

from conftest import AGENTTRACE, need_bpf
from agenttrace.kernel import wire as ev
from agenttrace.paths import probes_dir
from agenttrace.match.policy import SCOPE_EXTERNAL, ProtocolDrop
from agenttrace.decode.protocols import PROTO_HINT_IDS, classify, flow_parts
from test_flow_probes import Kernel, data, flows

PY = sys.executable

# Sends each piece as its own segment (TCP_NODELAY, a pause between pieces), then waits for a
# reply line. Prints its local port first so the test can find its flow in the pool's log.
# argv: host, port, seconds to wait for the reply, pieces. Where the kernel is to drop the
# flow no reply comes: 2.5 s is enough for several retransmissions (from ~0.2 s, doubling),
# each of which the far side must not see either; 4 s where a reply is awaited.
DROPPED_WAIT, REPLY_WAIT = "2.5", "4"
PIECES = (
    "import socket, sys, time\n"
    "s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
    "s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n"
    "print(s.getsockname()[1], flush=True)\n"
    "for i, piece in enumerate(sys.argv[4:]):\n"
    "    if i:\n"
    "        time.sleep(0.3)\n"
    "    s.sendall(bytes.fromhex(piece))\n"
    "try:\n"
    "    got = s.recv(4096)\n"
    "    print('REPLY', got[:60].hex() if got else 'EOF', flush=True)\n"
    "except OSError as e:\n"
    "    print('ERR', e, flush=True)\n"
)

SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
SUBSCRIBE = json.dumps({"id": 1, "method": "mining.subscribe", "params": ["xmrig/6.21.0"]}).encode() + b"\n"
LOGIN = json.dumps({"id": 1, "jsonrpc": "2.0", "method": "login",
                    "params": {"login": "4AbCdEf", "pass": "x", "agent": "XMRig/6.21.0"}}).encode() + b"\n"

# (name, pieces, expected kernel protocol)
DISGUISES = {
    "ssh-one-byte-then-rest": ([SSH_BANNER[:1], SSH_BANNER[1:]], ev.PROTO_SSH),
    "ssh-after-prebanner-lines": ([b"hello there\r\nwelcome\r\n", SSH_BANNER], ev.PROTO_SSH),
    "stratum-leading-space": ([b" " + SUBSCRIBE], ev.PROTO_STRATUM),
    "stratum-300-bytes-padding": ([b" \r\n\t" * 75 + LOGIN], ev.PROTO_STRATUM),
    "stratum-padding-in-own-segments": ([b" " * 200, b"\n" * 200, LOGIN], ev.PROTO_STRATUM),
    # all six of isspace's blanks, a length no multiple of the kernel's 8-byte words (flow.c
    # at_ws_run), split mid-word
    "stratum-every-blank-kind": ([b"\v\f \t\r\n" * 11 + b"\f", b"\x0b" * 5 + LOGIN], ev.PROTO_STRATUM),
}


def send_pieces(lab, cgroup, pieces, port=443, wait=REPLY_WAIT):
    r = lab.python_in_agent(PIECES, lab.pool_host, str(port), wait, *(p.hex() for p in pieces), cgroup=cgroup)
    lines = r.stdout.splitlines()
    assert lines, r.stderr
    return int(lines[0]), lines[1:]


def pool_saw(lab, cport):
    """Lines the pool stub received on the connection from local port cport."""
    return [e for e in lab.server_events("stratum") if e["peer_port"] == cport]


@pytest.fixture
def kernel(agent_tree, monkeypatch):
    need_bpf()
    k = Kernel(agent_tree.root, monkeypatch)
    try:
        yield k
    finally:
        k.close()


def test_flow_flag_constants_match_header():
    header = (probes_dir() / "agenttrace.h").read_text()
    found = {m.group(1): int(m.group(2), 16) for m in re.finditer(r"#define AT_(FLOWF_\w+)\s+(0x[0-9a-f]+)", header)}
    assert found and all(getattr(ev, name) == v for name, v in found.items())
    assert set(ev.FLOWF_NAMES) == set(found.values())


@pytest.mark.parametrize("name", list(DISGUISES))
def test_disguised_first_bytes_are_classified_in_the_kernel(kernel, agent_tree, netlab, name):
    pieces, want = DISGUISES[name]
    a = agent_tree.agent(name)
    cport, _ = send_pieces(netlab, a, pieces)
    got = kernel.wait(lambda: [x for x in flows(kernel, direction=ev.DIR_EGRESS)
                               if x.sport == cport and x.proto_hint == want])
    assert len(got) == 1, "one decided record per flow and direction"
    f = got[0]
    # at most an interim copy before it (the peer spoke first), flagged as such
    assert all(x.fflags & ev.FLOWF_FLUSHED for x in flows(kernel, direction=ev.DIR_EGRESS)
               if x.sport == cport and x is not f)
    assert f.proto_hint == want and f.verdict == ev.VERDICT_ALLOWED
    assert f.h.agent_cgroup_id == os.stat(a).st_ino
    raw = b"".join(pieces)
    assert f.skipped == len(raw) - len(raw.lstrip())
    assert data(f) == raw.lstrip()[:ev.FLOW_BYTES]
    if len(pieces) > 1:
        assert f.fflags & ev.FLOWF_REASSEMBLED and f.segs >= len(pieces)
    if f.skipped:
        assert f.fflags & ev.FLOWF_PADDED
    net, flow = flow_parts(f)
    assert flow["protocol"] == {ev.PROTO_SSH: "ssh", ev.PROTO_STRATUM: "stratum"}[want]
    assert flow["padding"] == f.skipped and flow["segments"] == f.segs


def test_undecided_flow_is_sent_when_the_peer_answers_or_the_flow_ends(kernel, agent_tree, netlab):
    """Bytes that decide nothing (a short unknown request) still reach userspace: when the peer
    replies or the connection closes, what was collected goes out flagged `flushed`."""
    a = agent_tree.agent("short")
    cport, out = send_pieces(netlab, a, [b"PING\r\n"], port=443)   # the stub answers bad JSON by closing
    f = kernel.wait(lambda: [x for x in flows(kernel, direction=ev.DIR_EGRESS) if x.sport == cport])
    assert f and data(f[0]) == b"PING\r\n" and f[0].fflags & ev.FLOWF_FLUSHED
    assert f[0].proto_hint == ev.PROTO_UNKNOWN


# bytes next to the blanks' values (0x09-0x0d, 0x20, and the same with the high bit) are not
# blanks: the skip stops at each, at every place in a word
@pytest.mark.parametrize("stop, at", [(b"\x08", 0), (b"\x0e", 3), (b"\x1f", 7), (b"\x21", 8),
                                      (b"\xa0", 13), (b"\x89", 62), (b"\x00", 64), (b"\x8d", 70)])
def test_the_blank_skip_stops_at_the_first_byte_that_is_not_one(kernel, agent_tree, netlab, stop, at):
    a = agent_tree.agent(f"stop-{stop.hex()}-{at}")
    blanks = (b" \t\n\v\f\r" * 12)[:at]
    cport, _ = send_pieces(netlab, a, [blanks + stop + b"PING\r\n"], port=443)
    f = kernel.wait(lambda: [x for x in flows(kernel, direction=ev.DIR_EGRESS) if x.sport == cport])
    assert f and f[0].skipped == at, (f[0].skipped if f else None)
    assert data(f[0]) == stop + b"PING\r\n"
    assert bool(f[0].fflags & ev.FLOWF_PADDED) == (at > 0)


@pytest.mark.parametrize("name", ["ssh-one-byte-then-rest", "ssh-after-prebanner-lines",
                                  "stratum-leading-space", "stratum-300-bytes-padding"])
def test_disguised_protocol_dropped_in_the_kernel_far_side_never_sees_it(kernel, agent_tree, netlab, name):
    pieces, want = DISGUISES[name]
    a = agent_tree.agent("enf-" + name)
    proto = "ssh" if want == ev.PROTO_SSH else "stratum"
    kernel.enforce([ProtocolDrop(11, 0, PROTO_HINT_IDS[proto], SCOPE_EXTERNAL, 0, 65535)])
    cport, out = send_pieces(netlab, a, pieces, wait=DROPPED_WAIT)
    blocked = kernel.wait(lambda: [x for x in flows(kernel) if x.sport == cport and x.verdict == ev.VERDICT_BLOCKED])
    assert blocked and blocked[0].proto_hint == want
    kernel.drain()
    # The pool stub logs every line it reads; a stream cut before its first newline ends as
    # an unparsable fragment at close. Neither may hold the protocol's telling bytes.
    seen = pool_saw(netlab, cport)
    assert not [e for e in seen if e.get("method")], seen
    assert not [e for e in seen if "SSH-" in e.get("raw", "")], seen
    assert not any(l.startswith("REPLY") and l != "REPLY EOF" for l in out), out


@pytest.mark.parametrize("mode", ["monitor", "enforce"])
def test_cli_split_ssh_banner_and_padded_stratum(netlab, tmp_path, mode, require_bpf):
    """Through `agenttrace run` with the default pack, as a user starts it."""
    out = tmp_path / "events.jsonl"
    script = (
        "import subprocess, sys\n"
        "for pieces in sys.argv[2:]:\n"
        "    subprocess.run([sys.executable, '-c', sys.argv[1], %r, '443', %r, *pieces.split(',')])\n"
    ) % (netlab.pool_host, DROPPED_WAIT if mode == "enforce" else REPLY_WAIT)
    split_ssh = ",".join(p.hex() for p in DISGUISES["ssh-one-byte-then-rest"][0])
    padded = ",".join(p.hex() for p in DISGUISES["stratum-300-bytes-padding"][0])
    r = subprocess.run([AGENTTRACE, "run", "--mode", mode, "--output", str(out), "--agent", f"disguise-{mode}-{os.getpid()}",
                        "--netns", netlab.agent_ns, "--", PY, "-c", script, PIECES, split_ssh, padded],
                       capture_output=True, timeout=240)
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    ports = [int(l.split()[0]) for l in r.stdout.decode().splitlines() if l.split() and l.split()[0].isdigit()]
    assert len(ports) == 2, r.stdout
    recs = [orjson.loads(l) for l in out.read_bytes().splitlines()]
    alerts = {}
    for a in recs:  # the agent's own bytes (egress); the pool's reply is stratum too
        if a["kind"] == "alert" and a.get("flow", {}).get("direction", "egress") == "egress":
            alerts.setdefault(a["rule"]["id"], a)
    ssh, stratum = alerts.get("tunnel-ssh-external-flow"), alerts.get("mining-stratum-flow")
    assert ssh and stratum, sorted(alerts)
    for al, proto, cport in ((ssh, "ssh", ports[0]), (stratum, "stratum", ports[1])):
        assert al["flow"]["protocol"] == proto and al["agent"]["id"] == f"disguise-{mode}-{os.getpid()}"
        assert al["net"]["src"]["port"] == cport and al["net"]["dst"]["addr"] == netlab.pool_host
        assert al["proc"]["pid"] and al["proc"]["comm"].startswith("python")
        seen = pool_saw(netlab, cport)
        if mode == "enforce":
            assert al["rule"]["outcome"] == "blocked" and al["net"]["verdict"] == "blocked"
            assert not [e for e in seen if e.get("method") or "SSH-" in e.get("raw", "")], seen
        else:
            assert al["rule"]["outcome"] == "reported"
            assert seen, "monitor mode lets the flow through"
    assert stratum["flow"]["padding"] == 300 and "reassembled" in ssh["flow"]["capture"]

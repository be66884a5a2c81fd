"""The node's interface networks read from one rtnetlink dump (enrich/nodenet.py) are what
pyroute2 reports, in the host's netns and in a fresh one with IPv4 and IPv6 addresses."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

COMPARE = r"""
import ipaddress, json
from pyroute2 import IPRoute
from agenttrace.enrich.nodenet import interface_networks, node_subnets
ref = []
with IPRoute() as ipr:
    for m in ipr.get_addr():
        a = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
        if a:
            ref.append(str(ipaddress.ip_network(f"{a}/{m['prefixlen']}", strict=False)))
print(json.dumps({"mine": [str(n) for n in interface_networks()], "ref": ref, "subnets": node_subnets()}))
"""


def _compare(prefix=()):
    p = subprocess.run([*prefix, sys.executable, "-c", COMPARE], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_same_networks_as_pyroute2_here():
    pytest.importorskip("pyroute2")
    r = _compare()
    assert r["mine"] == r["ref"] and r["mine"]


def test_same_networks_as_pyroute2_in_a_fresh_netns(require_bpf):
    pytest.importorskip("pyroute2")
    if not shutil.which("unshare") or not shutil.which("ip"):
        pytest.skip("needs unshare and ip")
    # a veth pair in a network namespace of its own: nothing can leave it
    setup = ("ip link set lo up && ip link add at0 type veth peer name at1 && ip link set at0 up && "
             "ip addr add 198.51.100.7/24 dev at0 && ip addr add 203.0.113.9/28 dev at0 && "
             "ip -6 addr add 2001:db8::5/64 dev at0 nodad && exec \"$0\" \"$@\"")
    r = _compare(["unshare", "-n", "sh", "-c", setup])
    assert r["mine"] == r["ref"]
    assert {"198.51.100.0/24", "203.0.113.0/28", "2001:db8::/64"} <= set(r["mine"])
    assert set(r["subnets"]) == {"198.51.100.0/24", "203.0.113.0/28", "2001:db8::/64"}

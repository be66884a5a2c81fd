"""The compact forms a long allow-list takes (issue #15, "how cost grows"): `run --allow-egress`
keeps its entries as an AllowList, the kernel policy its names as a NameAllowTable, names are
hashed from a cached parent hash and name_allow is written in one batch. Each must give what
the per-entry models gave: the same rules, the same kernel rows, the same errors, the same map."""
from __future__ import annotations

import ctypes as C
import os
import random
import string
import subprocess

import pytest

from agenttrace.kernel.egress import SpecError, parse_allow_spec, run_policy, write_name_allow
from agenttrace.match.egress_policy import AllowList, EgressPolicy, egress_rule_models
from agenttrace.match.policy import (NAME_EXACT, NameAllow, NameAllowTable, PolicyError, _SuffixHasher,
                                     compile_policy, name_hash)
from agenttrace.match.rules import load_rules

from conftest import AGENTTRACE

SPECS = ["pypi.org:443", "*.pythonhosted.org:443", "*.pypi.org:443", "10.0.0.2:53", "Mixed.Case.Example.",
         "git.corp.example:22", "git.corp.example:443", "[2001:db8::]/32:80-90", "192.0.2.0/24",
         "a.test:443", "b.test:443", "a.test:443", "n1.bench.test:443", "x:8000-8100"]


def _models_policy(specs):
    """The policy as the config file's models give it: one validated EgressDest per entry."""
    pol = run_policy(specs, "enforce")["default"]
    return {"default": EgressPolicy(mode="allow-list", scopes=list(pol.scopes),
                                    allow=[parse_allow_spec(s) for s in specs], action="block", severity="high")}


def _reference_rows(allow, gid):
    """The name rows as the per-entry compiler made them (one NameAllow per name, merged by hash)."""
    from agenttrace.match.policy import NAME_SUBDOMAINS, PROTO_NUM, _port_range
    names = {}
    for a in allow:
        if a.name is None:
            continue
        wild = a.name.startswith("*.")
        base = a.name[2:] if wild else a.name
        rng = [(lo, hi, PROTO_NUM[a.proto]) for lo, hi in ([_port_range(p) for p in a.ports] or [(1, 65535)])]
        flag = NAME_SUBDOMAINS if wild else NAME_EXACT
        h = name_hash(base)
        old = names.get(h)
        if old is not None:
            flag |= old.flags
            rng = list(dict.fromkeys(list(old.ranges) + rng))
        names[h] = NameAllow(gid, base if flag == NAME_EXACT else a.name, h, flag, tuple(rng))
    return list(names.values())


def test_suffix_hasher_equals_name_hash():
    rnd = random.Random(15)
    names = ["a", "com", "pypi.org", "x.pypi.org", "a.b.c.d.e.f", "n0.bench.test", "n99999.bench.test"]
    for _ in range(2000):
        labels = ["".join(rnd.choice(string.ascii_lowercase + string.digits + "-_") for _ in range(rnd.randint(1, 12)))
                  for _ in range(rnd.randint(1, 5))]
        names.append(".".join(labels))
    h = _SuffixHasher()
    for n in names + names:       # the second pass reads the cached parents
        assert h(n) == name_hash(n), n


def test_allow_list_gives_the_rules_and_kernel_rows_of_one_model_per_entry():
    compact, models = run_policy(SPECS, "enforce"), _models_policy(SPECS)
    assert isinstance(compact["default"].allow, AllowList)
    assert list(compact["default"].allow) == models["default"].allow
    assert [a.spec() for a in compact["default"].allow] == [a.spec() for a in models["default"].allow]
    assert egress_rule_models(compact) == egress_rule_models(models)
    kc = compile_policy(load_rules([], egress=compact))
    km = compile_policy(load_rules([], egress=models))
    assert isinstance(kc.name_allow, NameAllowTable)
    assert list(kc.name_allow) == list(km.name_allow) == _reference_rows(models["default"].allow, 1)
    assert len(kc.name_allow) == 8
    assert kc.dest_allow == km.dest_allow and kc.groups == km.groups and kc.policy_ids == km.policy_ids
    by = {n.pattern: n for n in kc.name_allow}
    assert by["mixed.case.example"].flags == NAME_EXACT
    assert sorted(by["git.corp.example"].ranges) == [(22, 22, 0), (443, 443, 0)]


def test_allow_list_errors_are_those_of_the_models(tmp_path):
    for specs, match in ((["pypi.org:443", "*.pypi.org:80"], "share the name 'pypi.org'"),
                         ([f"x.example:{p}" for p in range(1, 6)], "more than 4 port ranges")):
        for pol in (run_policy(specs, "enforce"), _models_policy(specs)):
            with pytest.raises(PolicyError, match=match):
                compile_policy(load_rules([], egress=pol))
    f = tmp_path / "allow.txt"
    f.write_text("ok.test:443\n# comment\n\nbad..name:443\n")
    with pytest.raises(SpecError) as e:
        run_policy(["@" + str(f)], "enforce")
    assert str(e.value) == f"{f}:4: --allow-egress 'bad..name:443': not a DNS name or '*.name' pattern: 'bad..name'"
    with pytest.raises(SpecError, match=r"^--allow-egress 'ok.test:0': '0' is not a port"):
        run_policy(["ok.test:0"], "enforce")


def test_name_allow_table_reads_as_name_allow_rows():
    rows = [NameAllow(1, "a.test", name_hash("a.test"), NAME_EXACT, ((443, 443, 6),)),
            NameAllow(2, "*.b.test", name_hash("b.test"), 3, ((1, 65535, 0), (80, 80, 17)))]
    t = NameAllowTable(rows)
    assert len(t) == 2 and list(t) == rows and t[1] == rows[1] and t[-1] == rows[1] and t == rows
    assert len(t.forms) == 2


def _name_map(max_entries=4096):
    """A real kernel hash map with name_allow's key and value layout (probes/net.c)."""
    from agenttrace.kernel import bpfsys
    key = ["at_dn_key", [["gid", "unsigned int"], ["pad", "unsigned int"], ["hash", "unsigned long long"]], "struct"]
    rng = ["at_prange", [["lo", "unsigned short"], ["hi", "unsigned short"], ["proto", "unsigned char"],
                         ["pad", "unsigned char"]], "struct"]
    val = ["at_dn_val", [["r", rng, [4]], ["flags", "unsigned char"], ["pad", "unsigned char", [3]]], "struct"]
    K, V = bpfsys.ctype_of(key), bpfsys.ctype_of(val)
    fd = bpfsys.map_create(1, C.sizeof(K), C.sizeof(V), max_entries, 1, "test_names")    # hash, NO_PREALLOC
    return bpfsys.Map("test_names", fd, 1, key, val, max_entries)


def _contents(m) -> dict:
    return {(k.gid, k.hash): (bytes(v)) for k, v in m.items()}


def _one_by_one(m, entries) -> dict:
    """What the per-entry writer (before the batch) put into the map, as {(gid, hash): value bytes}."""
    out = {}
    for e in entries:
        v = m.Leaf()
        for i, (lo, hi, proto) in enumerate(e.ranges):
            v.r[i].lo, v.r[i].hi, v.r[i].proto = max(lo, 1), hi, proto
        v.flags = e.flags
        out[(e.group_id, e.hash)] = bytes(v)
    return out


class _NoFd:
    """The same map seen through an object without a plain fd: the one-by-one path."""

    def __init__(self, m):
        self._m = m
        self.Key, self.Leaf = m.Key, m.Leaf

    def keys(self):
        return self._m.keys()

    def __setitem__(self, k, v):
        self._m[k] = v

    def __delitem__(self, k):
        del self._m[k]


class _BatchOnly(_NoFd):
    """The map with its fd, refusing single writes: a write must go through the batch call."""

    def __init__(self, m):
        super().__init__(m)
        self.map_fd = m.map_fd

    def __setitem__(self, k, v):
        raise AssertionError("written one by one, not in a batch")


@pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) needs root")
def test_batch_write_of_name_allow_into_a_real_map_then_rewrite_drops_only_stale():
    m = _name_map()
    try:
        specs = [f"n{i}.bench.test:443" for i in range(3000)] + ["*.wild.test:80-90", "git.corp.example:22",
                                                                 "git.corp.example:443"]
        kp = compile_policy(load_rules([], egress=run_policy(specs, "enforce")))
        write_name_allow(_BatchOnly(m), kp.name_allow)
        assert _contents(m) == _one_by_one(m, kp.name_allow) and len(m) == 3002
        # the keys read back in batches (several, and one) are the keys walked one by one
        from agenttrace.kernel.mapwrite import key_bytes
        walked = sorted(bytes(k) for k in m.keys())
        assert sorted(key_bytes(m, chunk=64)) == sorted(key_bytes(m)) == walked
        assert sorted(key_bytes(_NoFd(m))) == walked
        # a reload that narrows the list: kept names stay, dropped ones go, one write each way
        kp2 = compile_policy(load_rules([], egress=run_policy(specs[1000:], "enforce")))
        write_name_allow(m, kp2.name_allow)
        assert _contents(m) == _one_by_one(m, kp2.name_allow) and len(m) == 2002
        # the fallback writer leaves the same map
        write_name_allow(_NoFd(m), kp.name_allow)
        assert _contents(m) == _one_by_one(m, kp.name_allow)
        write_name_allow(m, [])
        assert len(m) == 0
    finally:
        os.close(m.map_fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="bpf(2) needs root")
def test_batch_write_past_the_maps_size_raises_as_one_by_one_did():
    from agenttrace.kernel.bpfsys import BpfError
    m = _name_map(max_entries=64)
    try:
        kp = compile_policy(load_rules([], egress=run_policy([f"n{i}.t" for i in range(100)], "enforce")))
        with pytest.raises(BpfError):
            write_name_allow(m, kp.name_allow)
        with pytest.raises(BpfError):
            write_name_allow(_NoFd(m), kp.name_allow)
    finally:
        os.close(m.map_fd)


def test_run_with_a_bad_allow_file_line_exits_2_naming_file_and_line(tmp_path):
    f = tmp_path / "allow.txt"
    f.write_text("".join(f"n{i}.bench.test:443\n" for i in range(1000)) + "[2001:db8::1:443\n")
    p = subprocess.run([AGENTTRACE, "run", "--mode", "enforce", f"--allow-egress=@{f}", "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert f"{f}:1001: --allow-egress '[2001:db8::1:443': unclosed '['" in p.stderr
    assert '"phase":"started"' not in p.stdout


def _reference_parse(spec: str):
    """--allow-egress SPEC as the parser before the compact forms read it (through EgressDest's
    validation): (is_cidr, value, ports) or the error text."""
    import ipaddress
    from pydantic import ValidationError
    from agenttrace.match.egress_policy import EgressDest
    s = spec.strip()
    if not s:
        return "empty --allow-egress value"
    host, port = s, None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            return f"--allow-egress {spec!r}: unclosed '['"
        rest = s[end + 1:]
        plen = ""
        if rest.startswith("/"):
            plen, _, rest = rest.partition(":")
            rest = ":" + rest if rest else ""
        if rest and not rest.startswith(":"):
            return f"--allow-egress {spec!r}: unexpected {rest!r} after ']'"
        host, port = s[1:end] + plen, (rest[1:] or None)
    elif s.count(":") == 1:
        host, port = s.split(":")
    ports = []
    if port is not None:
        lo, _, hi = port.partition("-")
        if not (lo.isdigit() and (hi.isdigit() or not hi)) or not 0 < int(lo) <= int(hi or lo) < 65536:
            return f"--allow-egress {spec!r}: {port!r} is not a port or range LO-HI (1-65535)"
        ports = [port]
    try:
        ipaddress.ip_network(host, strict=False)
        is_net = True
    except ValueError as e:
        is_net = False
        # since session 23 a spec of address characters only, with a prefix or colons, is
        # reported as a malformed network rather than as a name
        if ((":" in host and not host.strip("0123456789abcdefABCDEF:./"))
                or (":" not in host and "/" in host and not host.strip("0123456789./"))):
            return f"--allow-egress {spec!r}: not a network: {e}"
    try:
        if is_net:
            d = EgressDest(cidr=str(ipaddress.ip_network(host, strict=False)), ports=ports)
        else:
            d = EgressDest(name=host, ports=ports)
    except ValidationError as e:
        return f"--allow-egress {spec!r}: " + e.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
    return d.cidr is not None, d.spec(), tuple(d.ports)


def test_spec_parser_reads_every_spec_as_the_validated_models_did():
    from agenttrace.kernel.egress import _parse_spec
    rnd = random.Random(1015)
    specs = ["pypi.org", "pypi.org:443", "PyPI.org:443", "pypi.org.:443", " pypi.org ", "*.x.org:1-65535",
             "x.org:0", "x.org:65536", "x.org:0443", "x.org:65535", "x.org:44-3", "1.2.3.4", "1.2.3",
             "1.2.3.4:80", "10.0.0.0/8:443", "*.123", "123", "a_b.c-d", "-a.org", "a-.org", "a..b", "*.", "*",
             "a" * 63 + ".org", "a" * 64 + ".org", ".".join(["a" * 63] * 4), ".".join(["a" * 62] * 4) + ".b",
             "[2001:db8::1]:443", "[2001:db8::]/32:80-90", "2001:db8::1", "x.org:443:1", "ünï.org", "", ":443",
             "x.org:", "x.org:-1", "*.*.x.org"]
    alphabet = string.ascii_letters + string.digits + "-_.*:/[]"
    specs += ["".join(rnd.choice(alphabet) for _ in range(rnd.randint(1, 14))) for _ in range(3000)]
    for s in specs:
        try:
            got = _parse_spec(s)
        except SpecError as e:
            got = str(e)
        assert got == _reference_parse(s), s
    # a non-ASCII digit was a traceback (ValueError from int()), now the spec's error
    with pytest.raises(SpecError, match="is not a port or range"):
        _parse_spec("x.org:²")

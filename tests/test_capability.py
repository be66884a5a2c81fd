"""Lint, start and reload agree on what the kernel can hold (tracer/kernel/capability.py).

Property-style: many generated rule sets, some within the maps' limits and some past them
(slots per prefix or port, path length, port expansion, protocol slots). For each, `rules lint`
(capability.lint) accepts it exactly when writing it into the real, loaded maps succeeds; every
accepted set also reloads over the previous one. The probes are loaded once for the module
(compiling per example would take minutes)."""
import random
import subprocess

import pytest

from conftest import AGENTTRACE, need_bpf


@pytest.fixture(scope="module")
def maps():
    need_bpf()
    from agenttrace.kernel.loader import Probes
    p = Probes(("proc", "net", "flow"), 64)
    p.load()
    yield p
    p.close()


CIDRS = ["10.1.0.0/16", "10.1.2.0/24", "192.0.2.0/24", "198.51.100.7/32", "2001:db8::/32"]
PORTS = [22, 80, 443, 3333, 4444, 5555, 8080, 9000]


def _rule_yaml(rng: random.Random, i: int) -> str:
    kind = rng.choice(["dst", "dst", "ports", "exec", "flow"])
    head = (f"  - id: gen-{i}\n    description: generated rule number {i} for the agreement test\n"
            f"    category: egress\n    severity: high\n")
    if kind == "dst":
        ports = rng.sample(PORTS, rng.randint(1, 3))
        return head + (f"    on: [connect]\n    match: {{dst: {{cidrs: [{rng.choice(CIDRS)}], ports: {ports}}}}}\n"
                       "    action: block\n")
    if kind == "ports":
        lo = rng.choice([1000, 20000, 40000])
        width = rng.choice([1, 10, 5000])       # 5000 > the 4096-port expansion bound
        return head + f"    on: [connect]\n    match: {{dst: {{ports: [\"{lo}-{lo + width - 1}\"]}}}}\n    action: block\n"
    if kind == "exec":
        name = "/opt/" + "x" * rng.choice([10, 300])     # 300 > the kernel's path key
        return head.replace("egress", "exec") + f"    on: [exec]\n    match: {{exe: {{paths: [\"{name}\"]}}}}\n    action: kill\n"
    lo = rng.choice([22, 2000, 3333])
    return head.replace("egress", "tunnel") + (f"    on: [flow]\n    match: {{protocols: [ssh], dst: {{ports: [\"{lo}-{lo + 5}\"]}}}}\n"
                                                "    action: block\n")


def test_lint_start_reload_agree(maps, tmp_path):
    from agenttrace.kernel.capability import lint
    from agenttrace.kernel.maps import EnforceError, PolicyWriter
    from agenttrace.match.policy import compile_policy
    from agenttrace.match.rules import load_rules
    rng = random.Random(1234)
    writer = PolicyWriter(maps)
    accepted = refused = 0
    for n in range(60):
        f = tmp_path / f"set{n}.yaml"
        f.write_text("rules:\n" + "".join(_rule_yaml(rng, i) for i in range(rng.randint(1, 9))))
        errs = lint([f])
        loaded = True
        try:
            rs = load_rules([f])
        except Exception:
            loaded = False
        if not loaded:
            assert errs        # schema errors are lint errors too
            continue
        try:
            writer.apply(compile_policy(rs))     # start (and, from the 2nd set on, a reload)
            held = True
        except EnforceError as e:
            held = False
            why = str(e)
        if held:
            assert not errs, f"set {n}: lint refused a rule set the kernel holds: {errs}"
            accepted += 1
        else:
            assert errs, f"set {n}: lint accepted a rule set the kernel cannot hold ({why})"
            # the error names the rule, its file and line
            assert errs[0].rule_id and errs[0].file == str(f) and errs[0].line > 0, errs
            refused += 1
    assert accepted >= 10 and refused >= 5, (accepted, refused)


def test_lint_cli_names_rule_file_and_line(tmp_path):
    """Five distinct prefixes need five slots on one prefix key; the kernel has four."""
    f = tmp_path / "slots.yaml"
    body = "rules:\n"
    for i, port in enumerate([1, 2, 3, 4, 5]):
        body += (f"  - id: slot-{i}\n    description: blocks one port of the same prefix, slot {i}\n"
                 f"    category: egress\n    severity: high\n    on: [connect]\n"
                 f"    match: {{dst: {{cidrs: [192.0.2.0/24], ports: [{port}]}}}}\n    action: block\n")
    f.write_text(body)
    r = subprocess.run([AGENTTRACE, "rules", "lint", str(f)], capture_output=True, text=True)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"{f}:" in r.stderr and "slot-4" in r.stderr and "cannot hold" in r.stderr, r.stderr
    # and the same set refused at start, exit 2, nothing attached
    r2 = subprocess.run([AGENTTRACE, "run", "--rules", str(f), "--", "true"], capture_output=True, text=True)
    assert r2.returncode == 2 and "slot-4" in r2.stderr and "Traceback" not in r2.stderr, r2.stderr


def test_map_structs_match_what_the_writers_assume(maps):
    """The policy writers (kernel/maps.py, kernel/egress.py, decode/protocols.py) fill map keys
    by raw offsets and slot counts; BCC builds the key/leaf types from the C. This is the parity
    test for the map structs, as test_wire is for the record structs: a field moved or a slot
    added on one side only fails here."""
    import ctypes as C
    from agenttrace.kernel import maps as M
    from agenttrace.kernel.wire import COMM_LEN, CFG__MAX, PATH_MAX
    from agenttrace.decode.protocols import FLOW_SLOTS

    def layout(t):
        return [(name, getattr(t, name).offset, C.sizeof(ty)) for name, ty, *_ in t._fields_]
    assert layout(maps["scopes"].Key) == [("prefixlen", 0, 4), ("addr", 4, 16)]
    # _net writes gid at +4 and the v4-mapped address at +8 of the LPM key
    assert layout(maps["dst_policy"].Key) == [("prefixlen", 0, 4), ("gid", 4, 4), ("addr", 8, 16)]
    assert layout(maps["scope_policy"].Key) == [("gid", 0, 4), ("port", 4, 4)]
    assert layout(maps["flow_policy"].Key) == [("gid", 0, 4), ("proto", 4, 4)]
    for name, slots in (("dst_policy", M.SLOTS), ("scope_policy", M.SLOTS), ("flow_policy", FLOW_SLOTS)):
        s = maps[name].Leaf.s
        assert s.size // C.sizeof(maps[name].Leaf().s[0]) == slots, name
    assert [f for f, *_ in maps["group_allow"].Leaf._fields_][:2] == ["scope_mask", "policy_id"]
    assert C.sizeof(maps["kill_paths"].Key) == PATH_MAX and C.sizeof(maps["kill_names"].Key) == COMM_LEN
    assert maps["at_config"].max_entries == CFG__MAX

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

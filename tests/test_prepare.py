"""`agenttrace prepare` (tracer/ops/prepare.py): the probes a start will load compiled into the
cache ahead of it, so the node's first `run` and first daemon start load them as warm starts do.
Through the CLI as the README and setup start it, each with a cache of its own."""
import json
import os
import subprocess
import textwrap

from conftest import AGENTTRACE
from harness import Daemon


def _env(cache):
    return {**os.environ, "AGENTTRACE_PROBE_CACHE": str(cache)}


def _objects(cache):
    # compiled probe objects, not the BTF-offset and plan memos beside them
    return sorted(p.name for p in cache.glob("*.json") if not p.name.startswith(("btf-", "plan-"))) \
        if cache.exists() else []


def _started(out):
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    (s,) = [r for r in recs if r.get("kind") == "lifecycle" and r.get("phase") == "started"]
    return s


def _daemon_start(d, cache):
    """(started record, the daemon's stderr) of one daemon start on this cache."""
    try:
        d.start(env=_env(cache))
        (s,) = d.wait_record(lambda r: r.get("phase") == "started")
    finally:
        d.stop()
    err = d.stderr()
    d.out.unlink()
    return s, err


def test_prepared_first_starts_are_cache_hits(tmp_path, agent_tree, require_bpf):
    cache = tmp_path / "cache"
    d = Daemon(tmp_path, agent_tree.root, "", extra=textwrap.dedent("""\
        egress:
          web:
            mode: allow-list
            allow:
              - {name: pypi.org, ports: [443]}
        """))
    # the daemon's own default pack (no `rules:`), so its plan has tls like run's
    d.cfg.write_text(d.cfg.read_text().replace("rules: []\n", ""))
    # unprepared: the daemon compiles, and tells the operator how not to
    s, err = _daemon_start(d, cache)
    assert s["probe_cache"] == "compiled", s
    assert f"agenttrace prepare --config {d.cfg}" in err, err
    objs = _objects(cache)
    assert len(objs) == 1, objs

    p = subprocess.run([AGENTTRACE, "prepare", "--config", str(d.cfg)], capture_output=True, text=True,
                       timeout=300, env=_env(cache))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[:3]] == ["run", "run --allow-egress", f"daemon --config {d.cfg}"]
    assert "compiled in" in lines[0] and "compiled in" in lines[1], p.stdout
    assert "egress" in lines[1] and "egress" not in lines[0]
    # the object the daemon's own start compiled is the one prepare makes for its config
    assert lines[2].endswith("already in the cache"), p.stdout
    assert lines[-1] == f"probe cache: {cache}"
    objs = _objects(cache)
    assert len(objs) == 3, objs

    # the first start of each is a hit, and the launch-time prefetch guessed its plan
    for extra in ([], ["--allow-egress", "pypi.org:443"]):
        out = tmp_path / f"run{len(extra)}.jsonl"
        r = subprocess.run([AGENTTRACE, "run", *extra, "--output", str(out), "--", "true"],
                           capture_output=True, timeout=180, env=_env(cache))
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        s = _started(out)
        assert (s["probe_cache"], s["prefetch"]) == ("hit", "launch"), (extra, s)
    s, err = _daemon_start(d, cache)
    assert s["probe_cache"] == "hit", s
    assert "agenttrace prepare" not in err, err
    assert _objects(cache) == objs          # nothing compiled by the starts

    again = subprocess.run([AGENTTRACE, "prepare", "--config", str(d.cfg)], capture_output=True, text=True,
                           timeout=300, env=_env(cache))
    assert again.returncode == 0, again.stderr
    assert all(ln.endswith("already in the cache") for ln in again.stdout.splitlines()[:3]), again.stdout
    assert _objects(cache) == objs


def test_bad_config_exits_2_naming_file_and_line_and_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    cfg = tmp_path / "agenttrace.yaml"
    cfg.write_text("mode: enforce\nlimits:\n  wakeup_ms: fast\n")
    p = subprocess.run([AGENTTRACE, "prepare", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=120, env=_env(cache))
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert str(cfg) in p.stderr and ":3" in p.stderr and "wakeup_ms" in p.stderr, p.stderr
    assert p.stdout == "" and _objects(cache) == []


def test_nothing_to_prepare_and_cache_off_exit_2(tmp_path):
    p = subprocess.run([AGENTTRACE, "prepare", "--no-run", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=120, env=_env(tmp_path / "c"))
    assert p.returncode == 2 and "missing.yaml" in p.stderr, p.stderr
    p = subprocess.run([AGENTTRACE, "prepare"], capture_output=True, text=True, timeout=120,
                       env=_env("off"))
    assert p.returncode == 2 and "AGENTTRACE_PROBE_CACHE=off" in p.stderr, p.stderr


def test_a_run_command_line_is_prepared_as_that_run_loads(tmp_path, require_bpf):
    cache = tmp_path / "cache"
    args = ["--files", "--no-dns", "--no-rules"]
    p = subprocess.run([AGENTTRACE, "prepare", "--no-run", "--", "run", *args], capture_output=True, text=True,
                       timeout=300, env=_env(cache))
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith(f"run {' '.join(args)}: ") and "compiled in" in first, p.stdout
    fams = first.split("(")[1].split(")")[0].split(", ")
    assert "files" in fams and "dns" not in fams and "tls" not in fams   # no rules: no name check
    out = tmp_path / "run.jsonl"
    r = subprocess.run([AGENTTRACE, "run", *args, "--output", str(out), "--", "true"],
                       capture_output=True, timeout=180, env=_env(cache))
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert _started(out)["probe_cache"] == "hit"
    assert len(_objects(cache)) == 1


def test_command_lines_it_cannot_read_exit_2(tmp_path):
    for argv, says in ((["--", "run", "--bogus"], "run --bogus: not a command line"),
                       (["--", "tail"], "not `tail`"),
                       (["--", "run", "--rules", str(tmp_path / "none.yaml")], "none.yaml"),
                       (["--", "run", "--no-net", "--allow-egress", "pypi.org"], "needs the connect hooks")):
        p = subprocess.run([AGENTTRACE, "prepare", "--no-run", *argv], capture_output=True, text=True,
                           timeout=120, env=_env(tmp_path / "c"))
        assert p.returncode == 2 and says in p.stderr, (argv, p.stderr)
        assert _objects(tmp_path / "c") == []

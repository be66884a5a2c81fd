"""Probes compiled in a child and cached (tracer/kernel/probecache.py), loaded by the tracer
without BCC in its process (tracer/kernel/bpfsys.py, bpfobj.py)."""
import os
import subprocess

import pytest

from agenttrace.kernel import probecache
from conftest import AGENTTRACE


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("AGENTTRACE_PROBE_CACHE", str(d))
    return d


def test_memo_computes_once_and_ignores_files_others_could_write(cache):
    calls = []

    def compute():
        calls.append(1)
        return {"x": len(calls)}

    assert probecache.memo("t", ["a"], compute) == {"x": 1}
    assert probecache.memo("t", ["a"], compute) == {"x": 1}
    assert probecache.memo("t", ["b"], compute) == {"x": 2}
    assert len(calls) == 2
    (f,) = [p for p in cache.iterdir() if p.name.startswith("t-") and "x\": 1" in p.read_text()]
    os.chmod(f, 0o666)        # the kernel would run what it says: not trusted any more
    assert probecache.memo("t", ["a"], compute) == {"x": 3}
    os.chmod(cache, 0o777)
    assert probecache.memo("t", ["a"], compute) == {"x": 4}


def test_key_is_the_environment_not_the_interpreters_name(tmp_path, monkeypatch):
    """`python` and `python3` of one venv (the tests' interpreter and the entry point's
    shebang) share compiled probes; another environment, and any change of flags or source,
    does not."""
    import sys
    code = "import sys; from agenttrace.kernel import probecache as P; print(P.cache_key(sys.argv[1], ['-DA']))"
    exes = [os.path.join(sys.prefix, "bin", n) for n in ("python", "python3")]
    assert all(os.path.exists(e) for e in exes), exes
    keys = {subprocess.run([e, "-c", code, "src"], check=True, capture_output=True, text=True).stdout.strip()
            for e in exes}
    here = probecache.cache_key("src", ["-DA"])
    assert keys == {here}
    assert probecache.cache_key("src", ["-DB"]) != here
    assert probecache.cache_key("src2", ["-DA"]) != here
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert probecache.cache_key("src", ["-DA"]) != here


def test_eviction_keeps_the_objects_in_use(cache, monkeypatch):
    """A hit renews an object, so the cache evicts the least recently *used* one: the set a
    node starts with every day (prepared at install) outlives sets compiled once since."""
    monkeypatch.setattr(probecache, "KEEP", 2)
    objs = {n: {"format": probecache.FORMAT, "n": n} for n in ("daily", "once", "new")}
    for age, n in ((300, "daily"), (200, "once")):
        probecache._write(cache, f"{probecache.cache_key(n, [])}.json", objs[n])
        path = cache / f"{probecache.cache_key(n, [])}.json"
        os.utime(path, (path.stat().st_mtime - age,) * 2)
    assert probecache.cached("daily", []) == objs["daily"]     # the oldest write, used now
    probecache._write(cache, f"{probecache.cache_key('new', [])}.json", objs["new"])
    assert probecache.cached("daily", []) == objs["daily"]
    assert probecache.cached("new", []) == objs["new"]
    assert probecache.cached("once", []) is None


def test_cache_off_still_compiles_out_of_process(monkeypatch, require_bpf):
    from agenttrace.kernel.loader import Probes
    monkeypatch.setenv("AGENTTRACE_PROBE_CACHE", "off")
    p = Probes(("proc",), 64)
    p.load()
    try:
        assert not p.cache_hit
        t = p["watched"]
        t[t.Key(12345)] = t.Leaf(3)
        assert t[t.Key(12345)].value == 3 and len(t) == 1
        del t[t.Key(12345)]
        assert len(t) == 0
        assert p["at_config"][0].value == 0
    finally:
        p.close()


def test_second_load_comes_from_the_cache(cache, require_bpf):
    from agenttrace.kernel.loader import Probes
    hits = []
    for _ in range(2):
        p = Probes(("proc", "net"), 64)
        p.load()
        hits.append(p.cache_hit)
        # a per-CPU map reads as one value per possible CPU
        drops = p["drops"]
        assert drops.items() == []
        p.close()
    assert hits == [False, True]
    assert any(f.name.endswith(".json") and not f.name.startswith("btf-") for f in cache.iterdir())
    # the same feature set named in another order is the same compile (the cache key is the
    # source and the flags): a front end that lists its features differently gets the hit
    p = Probes(("net", "proc"), 64)
    p.load()
    assert p.cache_hit
    p.close()


def test_compile_error_names_file_and_line(cache, tmp_path, monkeypatch, require_bpf):
    from agenttrace.kernel import loader
    from agenttrace.kernel.loader import Probes, ProbeError
    bad = tmp_path / "probes"
    bad.mkdir()
    for f in ("agenttrace.h", "common.h", "proc.c"):
        (bad / f).write_text((loader.probes_dir() / f).read_text())
    (bad / "proc.c").write_text((bad / "proc.c").read_text() + "\nint broken(void) { return undeclared_thing; }\n")
    monkeypatch.setattr(loader, "probes_dir", lambda: bad)
    with pytest.raises(ProbeError, match=r"proc\.c:\d+.*undeclared_thing"):
        Probes(("proc",), 64).load()


def test_tracer_process_never_maps_the_compiler(tmp_path, require_bpf):
    """`run` as a user starts it: the command reads its parent's (the tracer's) mappings."""
    out = tmp_path / "records.jsonl"
    p = subprocess.run([AGENTTRACE, "run", "--output", str(out), "--",
                        "sh", "-c", "cat /proc/$PPID/maps"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "agenttrace" in out.read_text()
    maps = p.stdout
    assert "[stack]" in maps
    assert "libLLVM" not in maps and "libclang" not in maps and "libbcc" not in maps


def test_started_says_where_the_probes_came_from(tmp_path, require_bpf):
    # through the CLI as the README starts it: the first start on an empty cache compiles, the
    # next one takes the cache's object, and with the cache off every start compiles; a start
    # time can only be read knowing which (the first is seconds longer)
    import json

    def started(cache_env):
        out = tmp_path / f"run-{cache_env.replace('/', '_')}-{len(list(tmp_path.iterdir()))}.jsonl"
        r = subprocess.run([AGENTTRACE, "run", "--no-net", "--no-rules", "--output", str(out), "--", "true"],
                           capture_output=True, timeout=180,
                           env={**os.environ, "AGENTTRACE_PROBE_CACHE": cache_env})
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
        recs = [json.loads(line) for line in out.read_text().splitlines()]
        (s,) = [x for x in recs if x.get("kind") == "lifecycle" and x.get("phase") == "started"]
        return s["probe_cache"]

    d = tmp_path / "cache"
    assert started(str(d)) == "compiled"
    assert started(str(d)) == "hit"
    assert started("off") == "off"

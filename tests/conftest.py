"""Shared fixtures: real cgroups, a real tracer with probes in the kernel, cleanup by pid."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REQUIRE_BPF = os.environ.get("AGENTTRACE_REQUIRE_BPF") == "1"
REPO = Path(__file__).resolve().parent.parent
# the console script of the venv running the tests (wherever setup put that venv)
_BIN = Path(sys.executable).parent / "agenttrace"
AGENTTRACE = str(_BIN) if _BIN.exists() else shutil.which("agenttrace")

try:  # the network lab's fixtures (netns, sshd, pool stub) for every test module
    from netlab import netlab, netlab_fresh  # noqa: F401
except Exception:  # pragma: no cover - netlab reports its own requirement failures
    pass


def _bpf_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        return f"BCC not importable: {e}"
    try:
        from agenttrace.enrich.cgroups import cgroup2_mount
        cgroup2_mount()
    except Exception as e:
        return f"no cgroup2: {e}"
    return None


def need_bpf() -> None:
    """Kernel tests fail in CI (AGENTTRACE_REQUIRE_BPF=1) and skip with the reason elsewhere."""
    why = _bpf_unavailable()
    if why:
        if REQUIRE_BPF:
            pytest.fail(f"kernel test cannot run: {why} (AGENTTRACE_REQUIRE_BPF=1)")
        pytest.skip(f"kernel test cannot run: {why}")


@pytest.fixture
def require_bpf():
    need_bpf()


@pytest.fixture
def cgroup2_root() -> Path:
    need_bpf()
    from agenttrace.enrich.cgroups import cgroup2_mount
    return cgroup2_mount()


def _kill_and_rmdir(path: Path) -> None:
    from agenttrace.enrich.cgroups import kill_and_remove
    kill_and_remove(path)


@pytest.fixture
def outside(cgroup2_root):
    """A cgroup outside every watched subtree (where escapes go)."""
    p = cgroup2_root / f"agenttrace-outside-{uuid.uuid4().hex[:8]}"
    p.mkdir()
    try:
        yield p
    finally:
        _kill_and_rmdir(p)


def remove_pin_dir(pins: Path) -> None:
    """Unpin what a fail-closed test's tracer left in its own pin folder, and the folder."""
    if pins.is_dir():
        for f in pins.iterdir():
            f.unlink()
        pins.rmdir()
    try:
        pins.parent.rmdir()     # the run pin root, once no other run's folder is in it
    except OSError:
        pass


class AgentTree:
    """<cgroup2>/agenttrace-test-XXXX (the watched cgroup) with agent children."""

    def __init__(self, root: Path):
        self.root = root / f"agenttrace-test-{uuid.uuid4().hex[:8]}"
        self.root.mkdir()

    def agent(self, name: str) -> Path:
        p = self.root / name
        p.mkdir(exist_ok=True)
        return p

    def spawn(self, cgroup: Path, argv, **kw) -> subprocess.Popen:
        procs_file = str(cgroup / "cgroup.procs")

        def enter():
            with open(procs_file, "w") as f:
                f.write("0")
        return subprocess.Popen(argv, preexec_fn=enter, **kw)

    def run(self, cgroup: Path, argv, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        p = self.spawn(cgroup, argv, stdout=kw.pop("stdout", subprocess.PIPE),
                       stderr=kw.pop("stderr", subprocess.PIPE), **kw)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    def cleanup(self) -> None:
        _kill_and_rmdir(self.root)


@pytest.fixture
def agent_tree(cgroup2_root):
    tree = AgentTree(cgroup2_root)
    try:
        yield tree
    finally:
        tree.cleanup()


class ListSink:
    name = "list"

    def __init__(self):
        self.records: list[dict] = []
        self.dropped = 0

    def emit(self, record):
        self.records.append(record)

    def emit_batch(self, records):
        self.records.extend(records)

    def close(self):
        pass


class Session:
    """A started Tracer whose records land in a list; poll until what the test waits for."""

    def __init__(self, tracer, sink: ListSink):
        self.tracer = tracer
        self.sink = sink

    @property
    def records(self):
        return self.sink.records

    def of(self, kind, **where):
        out = []
        for r in self.sink.records:
            if r.get("kind") != kind:
                continue
            if all(_get(r, k) == v for k, v in where.items()):
                out.append(r)
        return out

    def wait_for(self, pred, timeout: float = 20.0):
        """Poll the ring buffer until pred() is truthy; generous timeout, no timing asserted."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tracer.poll(50)
            v = pred()
            if v:
                return v
        self.tracer.drain()
        return pred()

    def settle(self, rounds: int = 5):
        for _ in range(rounds):
            self.tracer.poll(20)
        self.tracer.drain()


def _get(rec: dict, dotted: str):
    cur = rec
    for part in dotted.split("__"):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


@pytest.fixture
def pin_dir(require_bpf):
    """A fresh bpffs folder for a daemon's pins; whatever is left in it is unpinned at the end
    (unpinning detaches the links)."""
    d = Path(f"/sys/fs/bpf/agenttrace-test-{uuid.uuid4().hex[:8]}")
    yield d
    if d.exists():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


@pytest.fixture
def make_session():
    """make_session(paths, **Options) → a started Session; stopped at teardown."""
    started = []

    def make(paths, engine=None, actor=None, **opts):
        from agenttrace.session.pipeline import Options, Tracer
        sink = ListSink()
        tracer = Tracer(Options(cgroups=list(paths), **opts), [sink], engine=engine, actor=actor)
        tracer.start()
        started.append(tracer)
        return Session(tracer, sink)
    yield make
    for t in started:
        t.stop()


def _demo_leftovers():
    from agenttrace.enrich.cgroups import cgroup2_mount
    cg = sorted(p.name for p in cgroup2_mount().iterdir() if p.name.startswith("agenttrace-demo-"))
    ns = sorted(n for n in os.listdir("/run/netns") if n.startswith("at-")) if os.path.isdir("/run/netns") else []
    return cg, ns


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`agenttrace demo --events FILE` run once, the way the README's `make demo` runs it:
    (completed process, events file, leftovers before, leftovers after). The demo test and the
    report test share it (it takes half a minute)."""
    need_bpf()
    events = tmp_path_factory.mktemp("demo") / "demo.jsonl"
    before = _demo_leftovers()
    r = subprocess.run([AGENTTRACE, "demo", "--no-color", "--events", str(events)],
                       capture_output=True, text=True, timeout=300)
    return r, events, before, _demo_leftovers()


@pytest.fixture
def python():
    return sys.executable

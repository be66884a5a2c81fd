"""The shared parent of `run`'s agent cgroups (<cgroup2>/agenttrace): concurrent runs may make it
at the same moment, and the last one out removes it, whoever made it (it used to stay behind for
good when the run that made it was not the last to end). Real cgroups, under a parent of the
test's own so that other checkouts' runs cannot interfere."""
from __future__ import annotations

import os
import threading

import pytest

from agenttrace.enrich.cgroups import TempCgroup


@pytest.fixture
def parent(cgroup2_root):
    p = cgroup2_root / f"at-shared-{os.getpid()}"
    yield p
    for c in sorted(p.glob("*/"), reverse=True) if p.exists() else ():
        if c.is_dir():
            c.rmdir()
    if p.exists():
        p.rmdir()


def test_the_last_one_out_removes_the_parent_whoever_made_it(parent):
    a = TempCgroup(f"{parent.name}/a", shared_parents=1)
    b = TempCgroup(f"{parent.name}/b", shared_parents=1)
    a.create()                      # a makes the parent
    b.create()                      # b finds it
    assert parent.is_dir()
    a.remove()                      # the maker leaves first: b's cgroup is still inside
    assert parent.is_dir() and (parent / "b").is_dir()
    b.remove()                      # the last one out takes it, though b did not make it
    assert not parent.exists()


def test_a_parent_left_empty_earlier_is_taken_by_the_next_run(parent):
    parent.mkdir()
    c = TempCgroup(f"{parent.name}/c", shared_parents=1)
    c.create()
    c.remove()
    assert not parent.exists()


def test_without_shared_parents_only_what_it_made_goes(parent):
    parent.mkdir()
    c = TempCgroup(f"{parent.name}/c")
    c.create()
    c.remove()
    assert parent.is_dir() and not (parent / "c").exists()


def test_concurrent_users_make_and_remove_the_parent_without_failing(parent):
    # many users entering and leaving at once: a mkdir that finds the parent just made, or a
    # child mkdir whose parent another user just removed, is not an error
    errors = []

    def user(i):
        try:
            for j in range(25):
                t = TempCgroup(f"{parent.name}/u{i}-{j}", shared_parents=1)
                t.create()
                assert (parent / f"u{i}-{j}").is_dir()
                t.remove()
        except BaseException as e:      # pragma: no cover - the failure being tested for
            errors.append(repr(e))

    ts = [threading.Thread(target=user, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []
    assert not parent.exists()

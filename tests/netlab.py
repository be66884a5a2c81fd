"""The network lab's pytest fixtures. The lab itself is `agenttrace.lab.netlab` (the demo uses it
too); tests/conftest.py imports these fixtures (`from netlab import netlab, netlab_fresh`).
Test modules must not import the fixtures again: each import defines another session fixture,
i.e. another lab."""
import os

import pytest

from agenttrace.lab.netlab import *  # noqa: F401,F403  (NetLab, addresses, helpers for tests)
from agenttrace.lab.netlab import NetLab, _require, _stratum_reply, cgroup2_mount  # noqa: F401


def _lab_or_skip():
    why = _require()
    if why:
        if os.environ.get("AGENTTRACE_REQUIRE_BPF") == "1":
            pytest.fail(f"netlab: {why} (AGENTTRACE_REQUIRE_BPF=1)")
        pytest.skip(f"netlab: {why}")
    return NetLab()


@pytest.fixture(scope="session")
def netlab():
    """One lab for the whole session. Tests must not leave processes or tunnels running."""
    with _lab_or_skip() as lab:
        yield lab


@pytest.fixture
def netlab_fresh():
    """A lab of its own for a test that changes server state."""
    with _lab_or_skip() as lab:
        yield lab

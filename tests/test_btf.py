"""BTF offsets come from the running kernel and are checked against values we can know."""
import pytest

from agenttrace.kernel import btf as btf


def test_every_probe_field_found():
    offs = btf.probe_offsets()
    # this kernel (6.18) has every optional field too: the clone3 check must be on in CI
    assert set(offs) == set(btf.PROBE_FIELDS) | set(btf.OPTIONAL_FIELDS)
    # tgid follows pid in task_struct on every kernel since 2.6; a parser that mixed up
    # members would not reproduce that
    assert offs["AT_OFF_TASK_TGID"] == offs["AT_OFF_TASK_PID"] + 4
    assert offs["AT_OFF_MM_ARG_END"] == offs["AT_OFF_MM_ARG_START"] + 8


def test_missing_field_is_an_error():
    with pytest.raises(btf.BTFError, match="no_such_field"):
        btf.kernel_btf().member_offset("task_struct", "no_such_field")


def test_bad_blob_rejected():
    with pytest.raises(btf.BTFError):
        btf.BTF(b"\0" * 64)

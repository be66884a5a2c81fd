"""The ctypes mirrors match probes/agenttrace.h: sizes and every field offset."""
import ctypes
import subprocess
import textwrap

import pytest

from agenttrace import events as E
from agenttrace.paths import probes_dir


def _c_layout(tmp_path):
    lines = []
    for cname, cls in E.STRUCTS.items():
        lines.append(f'printf("{cname} size %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in cls._fields_:
            lines.append(f'printf("{cname}.{fname} %zu\\n", offsetof(struct {cname}, {fname}));')
    src = textwrap.dedent("""
        #include <stdio.h>
        #include <stddef.h>
        #include "agenttrace.h"
        int main(void) {
        %s
        return 0; }
    """) % "\n".join(lines)
    c = tmp_path / "layout.c"
    c.write_text(src)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-I", str(probes_dir()), "-o", str(exe), str(c)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def test_structs_match_header(tmp_path):
    layout = _c_layout(tmp_path)
    mismatches = []
    for cname, cls in E.STRUCTS.items():
        if int(layout[f"{cname} size"]) != ctypes.sizeof(cls):
            mismatches.append(f"sizeof {cname}: C {layout[f'{cname} size']} py {ctypes.sizeof(cls)}")
        for fname, *_ in cls._fields_:
            c_off = int(layout[f"{cname}.{fname}"])
            py_off = getattr(cls, fname).offset
            if c_off != py_off:
                mismatches.append(f"{cname}.{fname}: C {c_off} py {py_off}")
    assert not mismatches, "\n".join(mismatches)


def test_event_type_numbers_are_stable():
    header = (probes_dir() / "agenttrace.h").read_text()
    expected = {"AT_EV_EXEC": 1, "AT_EV_FORK": 2, "AT_EV_EXIT": 3, "AT_EV_CONNECT": 4,
                "AT_EV_CONN_RESULT": 5, "AT_EV_LISTEN": 6, "AT_EV_DNS": 7, "AT_EV_FLOW": 8,
                "AT_EV_DEVICE": 9, "AT_EV_FILE": 10, "AT_EV_SOCKET": 11, "AT_EV_ESCAPE": 12}
    for name, num in expected.items():
        assert f"{name} = {num}," in header
        assert getattr(E, name.replace("AT_", "")) == num


@pytest.mark.parametrize("raw,expect", [
    (b"a\0b c\0", ["a", "b c"]),
    (b"", []),
    (b"only", ["only"]),
    (b"x\0\xff\0", ["x", "\\xff"]),
])
def test_split_args(raw, expect):
    assert E.split_args(raw) == expect


def test_addr_str_v4_mapped_and_v6():
    import socket
    v4 = b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1])
    assert E.addr_str(v4, socket.AF_INET) == "127.0.0.1"
    v6 = bytes(15) + b"\x01"
    assert E.addr_str(v6, socket.AF_INET6) == "::1"

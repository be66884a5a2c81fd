"""The ctypes mirrors match probes/agenttrace.h: sizes and every field offset."""
import ctypes
import subprocess
import textwrap

import pytest

from agenttrace.kernel import wire as E
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
                "AT_EV_DEVICE": 9, "AT_EV_FILE": 10, "AT_EV_SOCKET": 11, "AT_EV_ESCAPE": 12,
                "AT_EV_SNI": 15}
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


def _defines(path):
    """Numeric `#define NAME VALUE` lines of a probe source (literal values only)."""
    import re
    out = {}
    for m in re.finditer(r"^#define\s+(AT_[A-Z0-9_]+)\s+(0x[0-9a-fA-F]+|\d+)(?:U?L*)?\b", path.read_text(), re.M):
        v = m.group(2)
        out[m.group(1)] = int(v, 16) if v.lower().startswith("0x") else int(v, 10)
    return out


def test_every_header_constant_is_mirrored():
    """Each constant of the wire header has one Python mirror with the same value (the C
    header is the source; a constant added on one side only fails here)."""
    bad = []
    for name, value in _defines(probes_dir() / "agenttrace.h").items():
        short = name[3:]
        if short.startswith("SYS_"):
            got = {v: k for k, v in E.SYS_NAMES.items()}.get(short[4:].lower())
        else:
            got = getattr(E, short, None)
        if got != value:
            bad.append(f"{name} = {value} in agenttrace.h, tracer/kernel/wire.py {short} = {got}")
    assert not bad, "\n".join(bad)


def test_probe_limits_and_bits_mirrored():
    """Constants userspace relies on that live in the probe sources rather than the header."""
    from agenttrace.kernel import maps as enforce
    from agenttrace.match import policy as policy
    from agenttrace.decode import protocols as protocols
    from agenttrace.session import pipeline as runtime
    common = _defines(probes_dir() / "common.h")
    net = _defines(probes_dir() / "net.c")
    flow = _defines(probes_dir() / "flow.c")
    files = _defines(probes_dir() / "files.c")
    tls = _defines(probes_dir() / "tls.c")
    from agenttrace.kernel import sniwrite
    pairs = {
        "AT_SCOPE_LOOPBACK": (common, policy.SCOPE_LOOPBACK), "AT_SCOPE_INTERNAL": (common, policy.SCOPE_INTERNAL),
        "AT_SCOPE_METADATA": (common, policy.SCOPE_METADATA), "AT_SCOPE_EXTERNAL": (common, policy.SCOPE_EXTERNAL),
        "AT_DROP_RATE_LIMITED": (common, runtime.RATE_LIMITED),
        "AT_DST_SLOTS": (net, enforce.SLOTS), "AT_FLOW_SLOTS": (flow, protocols.FLOW_SLOTS),
        "AT_FILE_POLICY_MAX": (files, enforce.FILE_POLICY_MAX),
        "AT_NAME_ALLOW_MAX": (net, enforce.NAME_ALLOW_MAX),
        "AT_SNI_ENTRIES": (tls, sniwrite.SNI_ENTRIES),
        "AT_SNI_NAME_MAX": (_defines(probes_dir() / "agenttrace.h"), policy.SNI_NAME_MAX),
    }
    bad = [f"{n}: C {src.get(n)} py {v}" for n, (src, v) in pairs.items() if src.get(n) != v]
    assert not bad, "\n".join(bad)

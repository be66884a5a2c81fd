"""SSH-file classification, relative-path resolution, match.file loading errors and the
kernel file-kill policy (no kernel needed)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agenttrace.decode.files import classify, file_body, flag_names, resolve
from agenttrace.match.policy import FILE_CLASS_NUM, FILE_OP_NUM, FileKill, compile_policy
from agenttrace.match.rules import RulesError, default_rule_paths, load_rules
from conftest import AGENTTRACE


@pytest.mark.parametrize("path,cls", [
    ("/home/u/.ssh/authorized_keys", "authorized_keys"),
    ("authorized_keys2", "authorized_keys"),
    ("/etc/ssh/authorized_keys", "authorized_keys"),
    ("/etc/ssh/ssh_host_ed25519_key", "host_key"),
    ("ssh_host_rsa_key", "host_key"),
    ("/etc/ssh/ssh_host_rsa_key.pub", None),
    ("/home/u/.ssh/id_ed25519", "private_key"),
    (".ssh/id_rsa", "private_key"),
    ("/home/u/.ssh/deploy-key", "private_key"),
    ("/home/u/.ssh/id_rsa.bak", "private_key"),
    ("/srv/keys/id_ecdsa", "private_key"),
    ("identity", "private_key"),
    ("/home/u/src/id_utils.py", None),
    ("/home/u/.ssh/id_ed25519.pub", "ssh_other"),
    ("/home/u/.ssh/known_hosts", "ssh_other"),
    ("/home/u/.ssh/known_hosts.old", "ssh_other"),
    ("/home/u/.ssh/config", "ssh_other"),
    ("/home/u/.ssh/environment", "ssh_other"),
    ("/home/u/.ssh/rc", "ssh_other"),
    ("/home/u/.ssh/authorized_keys.bak", "ssh_other"),
    ("/home/u/.ssh/", None),
    ("/home/u/.sshx/key", None),
    ("/home/u/x.ssh/key", None),
    ("/home/u/notes.txt", None),
])
def test_classify_matches_the_kernel_rules(path, cls):
    assert classify(path) == cls


def test_classify_agrees_with_the_kernel_classifier():
    """The C classifier in probes/files.c, compiled for the host with the same code, gives
    the same class for every case above (keeps the two implementations from drifting)."""
    import ctypes
    import re
    import shutil
    import tempfile
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    from agenttrace.paths import probes_dir
    src = (probes_dir() / "files.c").read_text()
    body = src[src.index("struct at_scan {"):src.index("/* A path that could not be read")]
    body = body.replace("BPF_PERCPU_ARRAY(file_scan, struct at_scan, 1);", "static struct at_scan scan0;")
    body = re.sub(r"volatile struct at_scan \*s = file_scan\.lookup\(&zero\);", "volatile struct at_scan *s = &scan0;", body)
    defs = src[src.index("#define AT_LE_AUTHORIZ"):src.index("/* State of the classifying scan")]
    c = ('#include "agenttrace.h"\n#define __always_inline inline\n' + defs + body +
         "int classify(const char *p, unsigned n) { return at_file_classify(p, n); }\n")
    d = Path(tempfile.mkdtemp())
    (d / "c.c").write_text(c)
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-I", str(probes_dir()), "-o", str(d / "c.so"), str(d / "c.c")], check=True)
    lib = ctypes.CDLL(str(d / "c.so"))
    names = {0: None, 1: "authorized_keys", 2: "private_key", 3: "host_key", 4: "ssh_other"}
    for mark in test_classify_matches_the_kernel_rules.pytestmark:
        if mark.name == "parametrize":
            for path, cls in mark.args[1]:
                b = path.encode() + b"\0"
                assert names[lib.classify(b, len(b))] == cls, path


def test_resolve_relative_paths(tmp_path):
    proc = tmp_path / "proc"
    (proc / "42" / "fd").mkdir(parents=True)
    os.symlink("/home/u/.ssh", proc / "42" / "cwd")
    os.symlink("/etc/ssh", proc / "42" / "fd" / "7")
    assert resolve("/abs/id_rsa", 42, -100, str(proc)) == ("/abs/id_rsa", True)
    assert resolve("id_rsa", 42, -100, str(proc)) == ("/home/u/.ssh/id_rsa", True)
    assert resolve("./id_rsa", 42, -100, str(proc)) == ("/home/u/.ssh/id_rsa", True)
    assert resolve("ssh_host_rsa_key", 42, 7, str(proc)) == ("/etc/ssh/ssh_host_rsa_key", True)
    # gone process or closed fd: the raw path, marked unresolved
    assert resolve("id_rsa", 43, -100, str(proc)) == ("id_rsa", False)
    assert resolve("id_rsa", 42, 9, str(proc)) == ("id_rsa", False)


def test_file_body_fields():
    b = file_body("/nonexistent-proc-test/.ssh/authorized_keys", 2, "openat", 0o2101, "authorized_keys",
                  True, 3, 999999, -100, False, False)
    assert b["op"] == "write" and b["verdict"] == "killed" and b["kill_effect"] == "no_io"
    assert b["flags"] == ["O_WRONLY", "O_CREAT", "O_APPEND"] and b["policy_id"] == 3
    r = file_body("authorized_keys", 2, "renameat2", 0, "authorized_keys", True, 3, 999999999, -100, False, False)
    assert r["kill_effect"] == "name_in_place" and r["flags"] == [] and r["path_unresolved"] is True
    f = file_body("", 1, "openat", 0, None, False, 0, 1, -100, True, False)
    assert f["path"] is None and f["class"] == "unknown" and f["path_read_failed"] is True
    assert flag_names(0) == ["O_RDONLY"]


def _write(tmp_path, text):
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(text))
    return f


BAD_FIELD = """
rules:
  - id: bad-file-rule
    description: a rule with a misspelt match.file field
    category: tunnel
    severity: high
    on: [file]
    match:
      file: {classes: [private_key], opz: [read]}
"""


def test_bad_match_file_field_names_file_and_line(tmp_path):
    f = _write(tmp_path, BAD_FIELD)
    with pytest.raises(RulesError) as ei:
        load_rules([f])
    e = ei.value.errors[0]
    assert e.file == str(f) and e.line == 9 and "opz" in e.message
    r = subprocess.run([AGENTTRACE, "rules", "lint", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and f"{f}:9:" in r.stderr


@pytest.mark.parametrize("match,on,msg", [
    ("{file: {classes: [secret_key]}}", "[file]", "unknown file class 'secret_key'"),
    ("{file: {ops: [append]}}", "[file]", "unknown file op 'append'"),
    ("{file: {classes: [private_key]}}", "[exec]", "match.file never applies to events of kind exec"),
])
def test_match_file_errors(tmp_path, match, on, msg):
    f = _write(tmp_path, f"""
    rules:
      - id: r1
        description: a rule with a bad match.file group
        category: tunnel
        severity: high
        on: {on}
        match: {match}
    """)
    with pytest.raises(RulesError) as ei:
        load_rules([f])
    assert any(msg in x.message for x in ei.value.errors), ei.value.errors


def test_block_on_file_is_a_lint_error(tmp_path):
    f = _write(tmp_path, """
    rules:
      - id: r1
        description: block cannot stop a file open in the kernel
        category: tunnel
        severity: high
        on: [file]
        match: {file: {classes: [private_key]}}
        action: block
    """)
    with pytest.raises(RulesError) as ei:
        load_rules([f])
    assert "'block' cannot act on file events" in str(ei.value)


def test_file_kill_compiles_to_kernel_policy_only_by_class_and_op(tmp_path):
    f = _write(tmp_path, """
    rules:
      - id: k-kernel
        description: kill any read of host keys, decided in the kernel
        category: tunnel
        severity: critical
        on: [file]
        match: {file: {classes: [host_key, private_key]}}
        action: kill
      - id: k-user
        description: a path condition is userspace only
        category: tunnel
        severity: high
        on: [file]
        match: {file: {classes: [private_key], paths: ["/srv/*"]}}
        action: kill
      - id: cel-file
        description: CEL sees the file section, typed
        category: tunnel
        severity: low
        on: [file]
        condition: 'file.class == "ssh_other" && file.op == "write" && file.flags.exists(f, f == "O_TRUNC")'
    """)
    rs = load_rules([f])
    assert rs.get("k-kernel").enforced_in == "kernel" and rs.get("k-user").enforced_in == "userspace"
    kp = compile_policy(rs)
    pid = next(p for p, r in kp.policy_ids.items() if r == "k-kernel")
    want = {FileKill(pid, FILE_CLASS_NUM[c], FILE_OP_NUM[o]) for c in ("host_key", "private_key") for o in ("read", "write")}
    assert set(kp.file_kill) == want
    assert "k-user" not in kp.policy_ids.values()


def test_cel_type_errors_on_file_fields(tmp_path):
    f = _write(tmp_path, """
    rules:
      - id: r1
        description: file.op is a string, not an int
        category: tunnel
        severity: low
        on: [file]
        condition: 'file.op == 2'
    """)
    with pytest.raises(RulesError):
        load_rules([f])


def test_default_pack_kernel_file_policy():
    rs = load_rules(default_rule_paths())
    kp = compile_policy(rs)
    assert [(e.fclass, e.op) for e in kp.file_kill] == [(FILE_CLASS_NUM["authorized_keys"], FILE_OP_NUM["write"])]
    assert kp.policy_ids[kp.file_kill[0].policy_id] == "ssh-authorized-keys-write"

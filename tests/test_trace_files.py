"""SSH-file probes (feature `files`) with real processes in real agent cgroups: classes,
ops, absolute paths, the default-pack alerts, scoping, and the in-kernel kill of an
authorized_keys write. Everything happens in a temporary $HOME-like folder; the machine's
real ~/.ssh and /etc/ssh are never touched."""
import ctypes
import os
import signal
import subprocess
import sys
import time

import pytest

PY = sys.executable
FEATURES = ("proc", "files")
KEY = b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHBwbmVkYnlhbmFnZW50 planted@agent\n"


def _engine(mode):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import default_rule_paths, load_rules
    return Engine(load_rules(default_rule_paths()), mode=mode)


@pytest.fixture
def home(tmp_path):
    """tmp/home/.ssh with a real key pair, known_hosts, authorized_keys; tmp/etc-ssh with a host key."""
    h = tmp_path / "home"
    ssh = h / ".ssh"
    ssh.mkdir(parents=True, mode=0o700)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(ssh / "id_ed25519")],
                   check=True, stdout=subprocess.DEVNULL)
    (ssh / "known_hosts").write_text("10.0.0.5 ssh-ed25519 AAAA\n")
    (ssh / "authorized_keys").write_text("")
    etc = tmp_path / "etc-ssh"
    etc.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "host", "-f", str(etc / "ssh_host_ed25519_key")],
                   check=True, stdout=subprocess.DEVNULL)
    return h


def files_of(sess, **where):
    return sess.of("file", **where)


def alerts(sess, rule_id):
    return [a for a in sess.of("alert") if a["rule"]["id"] == rule_id]


def _spawn_wait(agent_tree, cg, sess, argv, pred, **kw):
    """Run argv in cg while polling, so that /proc/<pid> still exists when the record is read."""
    p = agent_tree.spawn(cg, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    try:
        got = sess.wait_for(pred)
    finally:
        out, err = p.communicate(timeout=60)
    return p.returncode, got, out, err


def test_ssh_files_monitor_mode(agent_tree, make_session, home, tmp_path):
    a = agent_tree.agent("sshfiles")
    ssh = home / ".ssh"
    ak, priv, host = ssh / "authorized_keys", ssh / "id_ed25519", tmp_path / "etc-ssh" / "ssh_host_ed25519_key"
    sess = make_session([agent_tree.root], engine=_engine("monitor"), mode="monitor", features=FEATURES)

    # 1. shell append to authorized_keys: reported, and the key does land (monitor mode)
    r = agent_tree.run(a, ["/bin/sh", "-c", f"echo '{KEY.decode().strip()}' >> {ak}"])
    assert r.returncode == 0
    ev = sess.wait_for(lambda: files_of(sess, file__path=str(ak), file__op="write"))
    assert ev[0]["file"]["class"] == "authorized_keys" and ev[0]["file"]["verdict"] == "allowed"
    assert ev[0]["file"]["syscall"] in ("openat", "open") and "O_APPEND" in ev[0]["file"]["flags"]
    assert ev[0]["agent"]["id"] == "sshfiles" and ev[0]["proc"]["exe"] in ("/bin/sh", "/usr/bin/dash", "/bin/dash")
    al = sess.wait_for(lambda: alerts(sess, "ssh-authorized-keys-write"))[0]
    assert al["rule"]["outcome"] == "reported" and al["rule"]["severity"] == "critical"
    assert al["rule"]["category"] == "tunnel" and "T1098.004" in al["rule"]["tags"]
    assert ak.read_bytes() == KEY

    # 2. cat of a private key: credential access
    r = agent_tree.run(a, ["/bin/cat", str(priv)])
    assert r.returncode == 0 and b"PRIVATE KEY" in r.stdout
    ev = sess.wait_for(lambda: files_of(sess, file__path=str(priv), proc__comm="cat"))
    assert ev[0]["file"]["class"] == "private_key" and ev[0]["file"]["op"] == "read"
    assert ev[0]["file"]["flags"][0] == "O_RDONLY"
    al = sess.wait_for(lambda: alerts(sess, "ssh-private-key-read"))
    assert al[0]["file"]["path"] == str(priv) and al[0]["rule"]["severity"] == "high"

    # 3. a relative open after cd into .ssh: the absolute path comes from /proc/<pid>/cwd
    rc, ev, _, _ = _spawn_wait(agent_tree, a, sess, ["/bin/sh", "-c", f"cd {ssh} && read x < id_ed25519; sleep 1"],
                               lambda: files_of(sess, file__raw_path="id_ed25519"))
    assert rc == 0 and ev[0]["file"]["path"] == str(priv) and ev[0]["file"]["class"] == "private_key"

    # 4. mv tmp authorized_keys: the rename's new name is a write
    tmpkey = ssh / "ak.tmp"
    tmpkey.write_bytes(KEY)
    r = agent_tree.run(a, ["/usr/bin/mv", str(tmpkey), str(ak)])
    assert r.returncode == 0
    ev = sess.wait_for(lambda: [e for e in files_of(sess, file__path=str(ak))
                                if e["file"]["syscall"].startswith("rename")])
    assert ev[0]["file"]["op"] == "write" and ev[0]["file"]["class"] == "authorized_keys"
    assert ev[0]["file"]["flags"] == []

    # 5. python open(..., 'a'); openat with O_WRONLY|O_CREAT|O_APPEND
    r = agent_tree.run(a, [PY, "-c", f"open({str(ssh / 'authorized_keys2')!r}, 'a').write('x')"])
    assert r.returncode == 0
    ev = sess.wait_for(lambda: files_of(sess, file__path=str(ssh / "authorized_keys2")))
    assert {"O_WRONLY", "O_CREAT", "O_APPEND"} <= set(ev[0]["file"]["flags"])
    assert ev[0]["file"]["class"] == "authorized_keys" and ev[0]["file"]["op"] == "write"

    # 6. a host key (a temp one): critical
    r = agent_tree.run(a, ["/bin/cat", str(host)])
    assert r.returncode == 0
    al = sess.wait_for(lambda: alerts(sess, "ssh-host-key-read"))
    assert al[0]["file"]["class"] == "host_key" and al[0]["rule"]["severity"] == "critical"

    # 7. known_hosts and a .pub: ssh_other, no alert; the ssh toolchain reading a key: no alert
    agent_tree.run(a, ["/bin/cat", str(ssh / "known_hosts"), str(ssh / "id_ed25519.pub")])
    r = agent_tree.run(a, ["/usr/bin/ssh-keygen", "-y", "-f", str(priv)])
    assert r.returncode == 0, r.stderr
    sess.wait_for(lambda: files_of(sess, proc__exe="/usr/bin/ssh-keygen", file__path=str(priv)))
    sess.settle()
    kh = files_of(sess, file__path=str(ssh / "known_hosts"))
    assert kh and kh[0]["file"]["class"] == "ssh_other"
    assert files_of(sess, file__path=str(ssh / "id_ed25519.pub"))[0]["file"]["class"] == "ssh_other"
    priv_alerts = alerts(sess, "ssh-private-key-read")
    assert all(x["proc"]["exe"] != "/usr/bin/ssh-keygen" for x in priv_alerts)
    for x in sess.of("alert"):
        assert x["file"]["class"] != "ssh_other"

    # nothing else: only candidate paths reach userspace (python's own startup opens none)
    classes = {r["file"]["class"] for r in files_of(sess)}
    assert classes <= {"authorized_keys", "private_key", "host_key", "ssh_other"}
    assert sess.tracer.counters()["file_path_read_failures"] == 0


def test_outside_agent_cgroups_is_silent(agent_tree, make_session, home, tmp_path):
    ssh = home / ".ssh"
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce", features=FEATURES)
    # the test process itself is outside every agent cgroup: same actions, nothing reported, nothing killed
    r = subprocess.run(["/bin/sh", "-c", f"echo k >> {ssh / 'authorized_keys'}; cat {ssh / 'id_ed25519'} > /dev/null"])
    assert r.returncode == 0
    os.rename(ssh / "known_hosts", ssh / "authorized_keys2")
    with open(ssh / "id_ed25519") as f:
        f.read()
    # a marker inside the agent proves the session was reading while we acted
    a = agent_tree.agent("marker")
    agent_tree.run(a, ["/bin/cat", str(ssh / "id_ed25519.pub")])
    sess.wait_for(lambda: files_of(sess, file__path=str(ssh / "id_ed25519.pub")))
    sess.settle()
    assert [r["file"]["path"] for r in files_of(sess)] == [str(ssh / "id_ed25519.pub")]
    assert sess.of("alert") == []
    assert (ssh / "authorized_keys").read_text() == "k\n"


def test_enforce_kills_authorized_keys_append_in_kernel(agent_tree, make_session, home):
    a = agent_tree.agent("persist")
    ak = home / ".ssh" / "authorized_keys"
    ak.write_bytes(b"ssh-ed25519 AAAA existing@admin\n")
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce", features=FEATURES)
    r = agent_tree.run(a, ["/bin/sh", "-c", f"echo '{KEY.decode().strip()}' >> {ak}; echo survived"])
    assert r.returncode == -signal.SIGKILL
    assert b"survived" not in r.stdout
    assert ak.read_bytes() == b"ssh-ed25519 AAAA existing@admin\n", "the key bytes must never land"
    al = sess.wait_for(lambda: alerts(sess, "ssh-authorized-keys-write"))[0]
    assert al["rule"]["outcome"] == "killed" and al["rule"]["action"] == "kill"
    assert al["file"]["verdict"] == "killed" and al["file"]["kill_effect"] == "no_io"
    assert al["file"]["policy_id"] >= 1 and al["file"]["path"] == str(ak)
    ex = sess.wait_for(lambda: [e for e in sess.of("exit") if e["proc"]["pid"] == al["proc"]["pid"]])
    assert ex[0].get("signal") == 9


def test_enforce_rename_onto_authorized_keys_reports_name_in_place(agent_tree, make_session, home):
    a = agent_tree.agent("persist-mv")
    ssh = home / ".ssh"
    tmpkey = ssh / "ak.tmp"
    tmpkey.write_bytes(KEY)
    sess = make_session([agent_tree.root], engine=_engine("enforce"), mode="enforce", features=FEATURES)
    r = agent_tree.run(a, [PY, "-c", f"import os; os.rename({str(tmpkey)!r}, {str(ssh / 'authorized_keys')!r}); print('after')"])
    assert r.returncode == -signal.SIGKILL and b"after" not in r.stdout
    # honest: the rename completed before the process died
    assert (ssh / "authorized_keys").read_bytes() == KEY
    al = sess.wait_for(lambda: alerts(sess, "ssh-authorized-keys-write"))[0]
    assert al["rule"]["outcome"] == "killed" and al["file"]["kill_effect"] == "name_in_place"
    assert "new name was in place" in al["rule"]["message"]


def test_openat2_flags_from_open_how(agent_tree, make_session, home):
    a = agent_tree.agent("oa2")
    path = home / ".ssh" / "authorized_keys"
    code = (
        "import ctypes, os, struct, sys\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "how = ctypes.create_string_buffer(struct.pack('QQQ', os.O_WRONLY | os.O_APPEND, 0, 0))\n"
        f"fd = libc.syscall(437, -100, {str(path).encode()!r}, how, 24)\n"
        "sys.exit(0 if fd >= 0 else 3)\n")
    sess = make_session([agent_tree.root], mode="monitor", features=FEATURES)
    r = agent_tree.run(a, [PY, "-c", code])
    assert r.returncode == 0, r.stderr
    ev = sess.wait_for(lambda: files_of(sess, file__syscall="openat2"))
    assert ev[0]["file"]["op"] == "write" and "O_APPEND" in ev[0]["file"]["flags"]
    assert ev[0]["file"]["path"] == str(path)


def test_events_validate_against_schema(agent_tree, make_session, home):
    import json

    import jsonschema

    from agenttrace.paths import schema_dir
    a = agent_tree.agent("schema")
    sess = make_session([agent_tree.root], engine=_engine("monitor"), mode="monitor", features=FEATURES)
    agent_tree.run(a, ["/bin/cat", str(home / ".ssh" / "id_ed25519")])
    sess.wait_for(lambda: alerts(sess, "ssh-private-key-read"))
    v = jsonschema.Draft202012Validator(json.loads((schema_dir() / "event.schema.json").read_text()))
    recs = [r for r in sess.records if r["kind"] in ("file", "alert")]
    assert recs
    for r in recs:
        errs = [f"{list(e.path)}: {e.message}" for e in v.iter_errors(r)]
        assert not errs, errs

"""A reload between enforce and monitor flips every kernel enforcement together — connect
blocks, exec kills, file kills, protocol drops and the GPU fence — checked by what the kernel
does to real processes, not by reading flags back. All of them read one switch
(AT_CFG_ENFORCE in the shared at_config map); the GPU fence used to keep the mode it started
with."""
import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap

from harness import short_banner_wait

PY = sys.executable
NVIDIA_MAJOR = 195

OPEN = "import os, sys\ntry:\n    os.close(os.open(sys.argv[1], os.O_RDWR)); print(0)\nexcept OSError as e:\n    print(e.errno)\n"

RULES = """
rules:
  - id: test-reload-block
    description: test rule, blocks one loopback port in the kernel
    category: egress
    severity: high
    on: [connect]
    match: {{dst: {{cidrs: ["127.0.0.1/32"], ports: [{port}]}}}}
    action: block
  - id: test-reload-kill
    description: test rule, kills an exec by basename in the kernel
    category: exec
    severity: high
    on: [exec]
    match: {{exe: {{basenames: [at-reload-kill]}}}}
    action: kill
"""


def test_reload_flips_all_enforcement(netlab, agent_tree, make_session, tmp_path):
    from agenttrace.gpu.service import GpuConfig, GpuGroupPolicy
    from agenttrace.match.rules import default_rule_paths, load_rules
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    port = srv.getsockname()[1]
    rf = tmp_path / "r.yaml"
    rf.write_text(textwrap.dedent(RULES.format(port=port)))
    rs = load_rules(default_rule_paths() + [str(rf)])
    from agenttrace.match.engine import Engine
    sess = make_session([agent_tree.root], engine=Engine(rs, mode="enforce"), mode="enforce",
                        features=("proc", "net", "listen", "flow", "dns", "files"), internal=["10.77.0.0/24"],
                        gpu=GpuConfig(default=GpuGroupPolicy(allowed=False), interval_s=60))
    a = agent_tree.agent("flip")
    killme = tmp_path / "at-reload-kill"
    shutil.copy("/bin/true", killme)
    gpu = tmp_path / "nvidia0"
    os.mknod(gpu, 0o666 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, 0))
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    ak = ssh / "authorized_keys"
    ak.write_text("")

    def observe() -> dict:
        out = {}
        r = agent_tree.run(a, [PY, "-c", f"import socket; print(socket.socket().connect_ex(('127.0.0.1', {port})))"])
        out["connect_blocked"] = int(r.stdout.strip()) == errno.EPERM
        out["exec_killed"] = agent_tree.run(a, [str(killme)]).returncode == -9
        r = agent_tree.run(a, ["sh", "-c", f"echo key >> {ak}"])
        out["file_killed"] = r.returncode == -9 or r.returncode == 137
        r = agent_tree.run(a, [PY, "-c", OPEN, str(gpu)])
        out["gpu_denied"] = int(r.stdout.strip()) == errno.EPERM
        # SSH on 443 to an external host: the connect is allowed, the banner is dropped
        # a 3 s bound on connect and banner (ssh's ConnectTimeout) instead of `timeout 4` on the
        # whole login: a dropped banner fails as before, sooner; an allowed one is not cut short
        # by a slow login under load
        r = netlab.check_in_agent(short_banner_wait(netlab.ssh_argv(netlab.ssh_host, 443, command=["true"])),
                                  cgroup=a, timeout=30)
        out["flow_dropped"] = r.returncode != 0
        sess.settle()
        return out

    try:
        want_on = {k: True for k in ("connect_blocked", "exec_killed", "file_killed", "gpu_denied", "flow_dropped")}
        want_off = {k: False for k in want_on}
        assert observe() == want_on
        assert sess.tracer.reload_rules(rs, mode="monitor")
        assert observe() == want_off
        assert sess.tracer.reload_rules(rs, mode="enforce")
        assert observe() == want_on
    finally:
        srv.close()
        subprocess.run(["rm", "-f", str(gpu)])

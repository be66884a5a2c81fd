"""The kernel's exec kill by exact path (kill_paths, probes/proc.c) whatever ran before it on the
CPU: the filename buffer is per-CPU scratch, and a longer path exec'd just before left its bytes
after the new path's NUL, in the map key, so the kill was missed."""
import shutil
import signal
import textwrap


def test_kill_by_path_after_a_longer_path_on_the_same_cpu(agent_tree, make_session, tmp_path):
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import load_rules
    short = tmp_path / "k"
    shutil.copy("/bin/echo", short)
    longer = tmp_path / ("d" * 60) / ("x" * 60)
    longer.parent.mkdir()
    shutil.copy("/bin/true", longer)
    assert len(str(longer)) < 255
    rules = tmp_path / "rules.yaml"
    rules.write_text(textwrap.dedent(f"""
        rules:
          - id: test-kill-one-path
            description: test rule killing one exact executable path
            category: exec
            severity: high
            on: [exec]
            match:
              exe: {{paths: ["{short}"]}}
            action: kill
    """))
    a = agent_tree.agent("kill-path")
    sess = make_session([agent_tree.root], engine=Engine(load_rules([str(rules)]), mode="enforce"),
                        mode="enforce", features=("proc",))
    # one CPU for both execs: the long path's bytes are in that CPU's buffer
    r = agent_tree.run(a, ["taskset", "-c", "0", "/bin/sh", "-c", f"{longer}; exec {short} ran"])
    assert r.returncode == -signal.SIGKILL and r.stdout == b"", r
    ex = sess.wait_for(lambda: sess.of("exec", proc__filename=str(short)))[0]
    assert ex["proc"]["killed_in_kernel"] is True
    assert sess.of("exec", proc__filename=str(longer))


def test_kill_by_path_follows_reloads_that_drop_and_bring_back_every_path(agent_tree, make_session, tmp_path):
    """The kernel asks kill_paths only while a rule names a path (kill_paths_on): a reload to a
    pack with no path stops the kill, one that brings a path back kills again."""
    from agenttrace.match.engine import Engine
    from agenttrace.match.rules import load_rules
    target = tmp_path / "k2"
    shutil.copy("/bin/true", target)

    def pack(name, exe):
        f = tmp_path / name
        f.write_text(textwrap.dedent(f"""
            rules:
              - id: test-kill-path-reload
                description: test rule killing exact executable paths
                category: exec
                severity: high
                on: [exec]
                match:
                  exe: {exe}
                action: kill
        """))
        return load_rules([str(f)])
    on = pack("on.yaml", f'{{paths: ["{target}"]}}')
    off = pack("off.yaml", '{basenames: ["no-such-tool"]}')   # a kill by name, none by path
    a = agent_tree.agent("kill-path-reload")
    sess = make_session([agent_tree.root], engine=Engine(on, mode="enforce"), mode="enforce", features=("proc",))
    assert agent_tree.run(a, [str(target)]).returncode == -signal.SIGKILL
    assert sess.tracer.reload_rules(off)
    assert agent_tree.run(a, [str(target)]).returncode == 0
    assert sess.tracer.reload_rules(pack("on2.yaml", f'{{paths: ["{target}"]}}'))
    assert agent_tree.run(a, [str(target)]).returncode == -signal.SIGKILL

"""The daemon config: the shipped example loads, defaults are sane, and every bad input is
reported with file, line and field, all at once."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml

from agenttrace.config import Config, ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parent.parent / "packaging" / "agenttrace.example.yaml"


def issues_of(text: str) -> list:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "t.yaml")
    return ei.value.issues


def test_example_loads_cleanly_and_documents_every_key():
    cfg = load_config(EXAMPLE)
    assert cfg.source == str(EXAMPLE)
    assert cfg.mode == "monitor"
    assert [a.cgroup for a in cfg.agents] == ["/agents", "/kubepods.slice/*/agent-*"]
    assert cfg.agents[0].labels == {"cluster": "train-a", "team": "rl"}
    assert cfg.sinks.socket.path == "/run/agenttrace/events.sock"
    # Every model field appears as a key in the example (commented or not).
    text = EXAMPLE.read_text()

    def walk(model, prefix=""):
        for name, f in model.model_fields.items():
            assert f"{name}:" in text, f"{prefix}{name} is not documented in the example"
            ann = f.annotation
            for t in getattr(ann, "__args__", (ann,)):
                if isinstance(t, type) and hasattr(t, "model_fields"):
                    walk(t, f"{prefix}{name}.")
            if hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
    walk(Config)
    # The example values equal the defaults where the file says they are defaults.
    d = Config()
    assert cfg.limits == d.limits and cfg.metrics == d.metrics and cfg.pinning == d.pinning
    # the packaged daemon sends events to the file and the socket, not to the journal
    # (journald's rate limit would drop them uncounted); every other sink key is the default
    assert cfg.sinks.stdout is False and d.sinks.stdout is True
    assert cfg.sinks.file is not None and cfg.sinks.socket is not None
    assert cfg.sinks.format == d.sinks.format and cfg.sinks.syslog == d.sinks.syslog


def _uncomment_block(text: str, head: str) -> str:
    """Strip the leading '#' of the commented lines right after `head` (a top-level key)."""
    out, inside = [], False
    for line in text.splitlines(keepends=True):
        if line.startswith(head):
            inside = True
        elif inside and line.startswith("#  "):
            line = line[1:]
        elif inside:
            inside = False
        out.append(line)
    return "".join(out)


def test_commented_examples_in_the_example_are_valid_too():
    # Uncomment the "# example" lines of the optional blocks and load the result.
    text = EXAMPLE.read_text()
    text = text.replace("rules: []\n#  - /etc", "rules:\n  - /etc")
    text = text.replace("internal_cidrs: []\n#  - 10.20", "internal_cidrs:\n  - 10.20")
    text = text.replace("  file: null\n  #  path", "  file:\n    path").replace("  #  max_bytes", "    max_bytes")
    text = text.replace("  #  keep", "    keep")
    text = text.replace("  syslog: null\n  #  address", "  syslog:\n    address").replace("  #  facility", "    facility")
    text = text.replace("  #  filter:", "    filter:")
    for key in ("kinds", "min_severity", "agents", "labels"):
        text = text.replace(f"  #    {key}:", f"      {key}:")
    # the gpu: block, uncommented line by line
    text = _uncomment_block(text.replace("gpu: null\n#gpu:", "gpu:"), "gpu:")
    cfg = parse_config(text, "uncommented.yaml")
    assert cfg.sinks.syslog.filter.kinds == ["alert", "summary"] and cfg.sinks.syslog.filter.min_severity == "high"
    assert cfg.gpu is not None and cfg.gpu.groups[0].memory_quota_mib == 40960
    assert cfg.gpu.trainers[0].exe == ["/opt/train/bin/python*"]
    assert cfg.rules == ["/etc/agenttrace/rules.d/"]
    assert cfg.internal_cidrs == [ipaddress.ip_network("10.20.0.0/16")]
    assert cfg.sinks.file.max_bytes == 100 * 1024 * 1024 and cfg.sinks.file.keep == 5
    assert cfg.sinks.syslog.address == "/dev/log" and cfg.sinks.syslog.facility == "daemon"


def test_empty_file_is_all_defaults():
    cfg = parse_config("", "empty.yaml")
    assert cfg.mode == "monitor" and cfg.metrics.enabled is False
    assert cfg.metrics.address == ("127.0.0.1", 9464)
    assert cfg.sinks.stdout is True and cfg.sinks.file is None


def test_all_errors_at_once_with_line_and_field():
    text = """\
mode: enforcing
agents:
  - cgroup: agents
    name: "{bogus}"
  - cgroup: /ok
    labels: {id: x}
sinks:
  file:
    max_bytes: 10MiB
  socket: {path: /run/x.sock, colour: red}
limits:
  ring_buffer_pages: 1000
internal_cidrs: [10.0.0.0/8, 10.0.0.1/8]
metrics:
  listen: "localhost:99"
pinning: {fail_mode: ajar}
typo_key: 1
"""
    got = {(i.field, i.line) for i in issues_of(text)}
    assert ("mode", 1) in got
    assert ("agents[0].cgroup", 3) in got
    assert ("agents[0].name", 4) in got
    assert ("agents[1].labels", 6) in got
    assert ("sinks.file.path", 8) in got         # missing: points at its mapping
    assert ("sinks.socket.colour", 10) in got
    assert ("limits.ring_buffer_pages", 12) in got
    assert ("internal_cidrs", 13) in got
    assert ("metrics.listen", 15) in got
    assert ("pinning.fail_mode", 16) in got
    assert ("typo_key", 17) in got
    assert len(got) == 11


def test_error_text_names_file_line_and_field(tmp_path):
    p = tmp_path / "agenttrace.yaml"
    p.write_text("mode: monitor\nsinks:\n  stdout: maybe\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:3:")
    assert "sinks.stdout" in msg


def test_duplicate_keys_are_errors():
    (issue,) = issues_of("mode: enforce\nmetrics: {}\nmode: monitor\n")
    assert issue.field == "mode" and issue.line == 3 and "line 1" in issue.message


def test_yaml_syntax_error_has_a_line():
    (issue,) = issues_of("mode: monitor\nsinks: [\n  stdout: true\n")
    assert issue.line is not None and "YAML syntax" in issue.message


def test_top_level_must_be_a_mapping():
    (issue,) = issues_of("- a\n- b\n")
    assert "mapping" in issue.message


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read" in str(ei.value) and "missing.yaml" in str(ei.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("rules: [rules.d, /abs/r.yaml]\nsinks:\n  file: {path: out/ev.jsonl}\n")
    cfg = load_config(p)
    assert cfg.rules == [str(tmp_path / "rules.d"), "/abs/r.yaml"]
    assert cfg.sinks.file.path == str(tmp_path / "out" / "ev.jsonl")


def test_sinks_can_be_switched_off_and_sizes_take_units():
    cfg = parse_config("sinks: {stdout: false, socket: null, file: {path: /x, max_bytes: 1GiB, keep: 3}}")
    assert cfg.sinks.socket is None and cfg.sinks.stdout is False
    assert cfg.sinks.file.max_bytes == 1 << 30


def test_egress_and_gpu_are_typed_by_their_models():
    from agenttrace.gpu.service import GpuConfig
    from agenttrace.match.policy import EgressPolicy
    cfg = parse_config(yaml.safe_dump({"egress": {"web": {"mode": "allow-list", "allow": [{"cidr": "10.0.0.0/8", "ports": [443]}]}},
                                       "gpu": {"interval_s": 5, "default": {"allowed": True}}}))
    assert isinstance(cfg.egress["web"], EgressPolicy) and isinstance(cfg.gpu, GpuConfig)
    assert cfg.gpu.default.allowed and cfg.egress["web"].allow[0].ports == [443]
    with pytest.raises(ConfigError) as e:
        parse_config("gpu:\n  allow_agents: [a1]\negress:\n  default: deny\n", "c.yaml")
    text = str(e.value)
    assert "c.yaml:2:3: gpu.allow_agents: unknown key" in text
    assert "c.yaml:4:12: egress.default" in text


@pytest.mark.parametrize("text,field", [
    ("agents: [{cgroup: /sys/fs/cgroup/agents}]", "agents[0].cgroup"),
    ("agents: [{cgroup: /a/../b}]", "agents[0].cgroup"),
    ("agents: [{cgroup: /a, agent: children}]", "agents[0].agent"),
    ("agents: [{cgroup: /a, labels: {'bad key': x}}]", "agents[0].labels"),
    ("sinks: {format: xml}", "sinks.format"),
    ("sinks: {socket: {path: relative.sock}}", "sinks.socket.path"),
    ("sinks: {syslog: {address: 'loghost:514'}}", "sinks.syslog.address"),
    ("sinks: {syslog: {facility: local9}}", "sinks.syslog.facility"),
    ("sinks: {file: {path: /x, keep: 0}}", "sinks.file.keep"),
    ("sinks: {file: {path: /x, max_bytes: 10}}", "sinks.file.max_bytes"),
    ("limits: {agent_events_per_sec: -1}", "limits.agent_events_per_sec"),
    ("limits: {proc_table_size: 1}", "limits.proc_table_size"),
    ("pinning: {path: /tmp/pins}", "pinning.path"),
    ("metrics: {enabled: yes please}", "metrics.enabled"),
    ("egress: [1, 2]", "egress"),
])
def test_bad_values(text, field):
    issues = issues_of(text)
    assert [i.field for i in issues] == [field], issues
    assert issues[0].line == 1


def test_agent_cgroup_and_id_from_a_watch():
    cfg = parse_config("""
agents:
  - {cgroup: /agents}
  - {cgroup: /kubepods.slice/*/agent-*, agent: self, name: "{parent}/{name}"}
  - {cgroup: /ci, name: "ci-{name}-{cgroup_id}"}
""")
    child, pattern, tmpl = cfg.agents
    assert child.agent_cgroup("/agents/run-17") == "/agents/run-17"
    assert child.agent_cgroup("/agents/run-17/sub/deeper") == "/agents/run-17"
    assert child.agent_cgroup("/agents") == "/agents"           # processes directly in the watched cgroup
    assert child.agent_cgroup("/agentsX/run-1") is None
    assert child.agent_cgroup("/other/agents/run-1") is None
    assert child.agent_id("/agents/run-17") == "run-17"
    assert pattern.agent_cgroup("/kubepods.slice/pod-a/agent-7/x") == "/kubepods.slice/pod-a/agent-7"
    assert pattern.agent_cgroup("/kubepods.slice/pod-a/b/agent-7") is None  # '*' stays in one component
    assert pattern.agent_cgroup("/kubepods.slice/pod-a/worker-1") is None
    assert pattern.agent_id("/kubepods.slice/pod-a/agent-7") == "pod-a/agent-7"
    assert tmpl.agent_id("/ci/job-3", 99) == "ci-job-3-99"

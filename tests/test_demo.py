"""The README's main-job command: the demo runs end to end and cleans up after itself."""


def test_demo_detects_everything_and_cleans_up(demo_run):
    r, _events, before, after = demo_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "all behaviours detected" in r.stdout
    summary = r.stdout.split("=== summary")[1]
    assert "MISSED" not in summary and "unexpected" not in summary
    assert "detected, killed" in summary and "detected, blocked" in summary
    # nothing the demo made is left (comparing additions: other labs may come and go)
    assert set(after[0]) <= set(before[0]) and set(after[1]) <= set(before[1]), (before, after)

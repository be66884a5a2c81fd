"""agenttrace benchmark harness (issue 7): `python -m bench` measures what tracing costs,
agenttrace side by side with bpftrace and auditd, on C load generators it builds itself."""

# Scratch tool of bench/profiles/htcp-connect.md: the lead's /tmp/kinds.sh on cgroup agenttrace/htcpk.
# usage: [AT="agenttrace command"] bash kinds.sh STORM N   (output /tmp/htcp-kinds.jsonl)
set -e
CG=/sys/fs/cgroup/unified/agenttrace/htcpk
mkdir -p $CG/a
${AT:-.venv/bin/agenttrace} run --cgroup agenttrace/htcpk --mode enforce --output /tmp/htcp-kinds.jsonl 2>/tmp/htcp-kinds.err &
TP=$!
for i in $(seq 60); do grep -q started /tmp/htcp-kinds.err 2>/dev/null && break; sleep 0.5; done
sh -c "echo \$\$ > $CG/a/cgroup.procs; exec bench/out/bin/$1 $2" || true
sleep 1.5
kill -INT $TP; wait $TP || true
rmdir $CG/a $CG

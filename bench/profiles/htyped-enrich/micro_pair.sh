#!/bin/bash
# paired pipeline_micro: before and after alternated, order swapped each round
N=${1:-10000}; R=${2:-4}; shift 2
for r in $(seq 1 $R); do
  if [ $((r % 2)) -eq 1 ]; then order="before after"; else order="after before"; fi
  for side in $order; do
    if [ $side = before ]; then d=/work/wt-before; else d=/work/wt-htyped-enrich; fi
    out=$(cd $d && .venv/bin/python -m bench.pipeline_micro $N "$@" 2>&1 | grep "userspace pipeline")
    echo "round $r $side: $out"
  done
done

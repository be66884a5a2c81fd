#!/bin/bash
R=${1:-4}
for r in $(seq 1 $R); do
  if [ $((r % 2)) -eq 1 ]; then order="before after"; else order="after before"; fi
  for side in $order; do
    if [ $side = before ]; then d=/work/wt-before; else d=/work/wt-htyped-enrich; fi
    echo "round $r $side: $(cd $d && .venv/bin/python /tmp/hte/enrmicro.py 10000 2>&1 | tail -1)"
  done
done

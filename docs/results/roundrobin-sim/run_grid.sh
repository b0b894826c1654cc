#!/bin/bash
# Every line of GRID (default: grid.txt beside this script) for seeds 0, 1, 2, two at a time,
# appending one JSON line per run to OUT (default: results.jsonl). Run from the repository root.
here=$(dirname "$0"); grid=${1:-$here/grid.txt}; out=${2:-$here/results.jsonl}
while read -r line; do for s in 0 1 2; do echo "$line seed=$s"; done; done < "$grid" | \
  OPENBLAS_NUM_THREADS=1 xargs -P 2 -I{} sh -c "python $here/simulate.py {} >> $out"

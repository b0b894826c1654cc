#!/usr/bin/env bash
# One `minasgd bench step` of a commit, from a clean clone: our step against the same net in
# PyTorch, each at 1 thread, at its default threads and in the 1..N scaling table (one JSON line
# appended to results.jsonl beside this script: the commit, the machine, the load average, the
# library versions and the whole `--json` result). PYTHON is an interpreter that has minasgd's
# dependencies and PyTorch (`pip install torch`); the clone's own code is the one timed.
#   PYTHON=/path/to/python docs/results/bench-step/measure.sh COMMIT [LABEL] [bench step flags...]
#   python docs/results/bench-step/table.py       # the markdown table (docs/cpu.md)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(git -C "$here" rev-parse --show-toplevel)"
commit="$(git -C "$repo" rev-parse --short "$1")"
label="${2:-$commit}"
shift $(( $# < 2 ? $# : 2 ))
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/main"
git -C "$work/main" checkout -q "$commit"
ln -s ../kernels "$work/main/minasgd/kernels"  # minasgd.kernels from this clone, as an install maps it
(cd "$work/main" && PYTHONPATH="$work/main" "$python" -m minasgd bench step --json "$@" > "$work/out.json")
"$python" - "$work/out.json" "$commit" "$label" "$*" >> "$here/results.jsonl" <<'PY'
import datetime, json, os, platform, sys

import numpy
import torch

out, commit, label, flags = sys.argv[1:]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(json.dumps({"label": label, "commit": commit, "flags": flags,
                  "date_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"),
                  "cores": len(os.sched_getaffinity(0)), "cpu": cpu, "numpy": numpy.__version__,
                  "torch": torch.__version__, "result": json.load(open(out))}))
PY
tail -c 300 "$here/results.jsonl"; echo

#!/usr/bin/env bash
# One timed `.ci/run` of a commit, from a clean clone, as CI runs it (CI=true, no standard input).
# Appends one JSON line to results.jsonl beside this script: the commit, the machine, the load
# average before and after, the whole run's wall and CPU seconds, and each pytest run's closing
# line (its count and its own wall time: the suite as the README's test command runs it), and the
# tests that failed. Run it where SIGINT and SIGHUP are not ignored (not under nohup, not as `cmd &`
# from a script): the tests of the server's stop signals send them, and an ignored one stays ignored.
#   docs/results/suite-times/measure.sh COMMIT [LABEL]
#   python docs/results/suite-times/table.py      # the markdown table (docs/cpu.md)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(git -C "$here" rev-parse --show-toplevel)"
commit="$(git -C "$repo" rev-parse --short "$1")"
label="${2:-$commit}"
work="$(mktemp -d)"
git clone -q "$repo" "$work/main"
git -C "$work/main" checkout -q "$commit"
load_before="$(cut -d' ' -f1 /proc/loadavg)"
set +e
(cd "$work/main" && CI=true /usr/bin/time -f "TIME %e %U %S" bash .ci/run < /dev/null > "$work/log" 2>&1)
status=$?
set -e
load_after="$(cut -d' ' -f1 /proc/loadavg)"
python3 - "$work/log" "$commit" "$label" "$status" "$load_before" "$load_after" >> "$here/results.jsonl" <<'PY'
import json, os, platform, re, sys, datetime
log, commit, label, status, before, after = sys.argv[1:]
text = open(log).read()
wall, user, system = map(float, re.findall(r"^TIME (\S+) (\S+) (\S+)$", text, re.M)[-1])
runs = [{"line": m.group(0).strip("= "), "seconds": float(m.group(1))}
        for m in re.finditer(r"^=*\s*\d+ (?:passed|failed)[^\n]* in ([\d.]+)s.*$", text, re.M)]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
print(json.dumps({"label": label, "commit": commit, "date_utc": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M"),
                  "cores": len(os.sched_getaffinity(0)), "cpu": cpu, "load_before": float(before),
                  "load_after": float(after), "exit": int(status), "ci_wall_seconds": wall,
                  "ci_cpu_seconds": round(user + system, 1), "pytest_runs": runs,
                  "failed": re.findall(r"^FAILED (\S+)", text, re.M)}))
PY
tail -1 "$here/results.jsonl"
rm -rf "$work"

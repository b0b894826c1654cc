"""The markdown table of docs/results/suite-times/results.jsonl (docs/cpu.md, "The test suite")."""
import json
from pathlib import Path

rows = [json.loads(line) for line in (Path(__file__).parent / "results.jsonl").read_text().splitlines() if line.strip()]
print("| run | commit | measured (UTC) | cores | load avg before / after | pytest runs (their own closing line) "
      "| suite wall s | `.ci/run` wall s | `.ci/run` CPU s | exit |")
print("| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")
for r in rows:
    runs = "; ".join(run["line"] for run in r["pytest_runs"])
    suite = sum(run["seconds"] for run in r["pytest_runs"])
    print(f"| {r['label']} | {r['commit']} | {r['date_utc']} | {r['cores']} | {r['load_before']:.1f} / {r['load_after']:.1f} "
          f"| {runs} | {suite:.0f} | {r['ci_wall_seconds']:.0f} | {r['ci_cpu_seconds']:.0f} | {r['exit']} |")

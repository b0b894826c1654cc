"""The before/after table of docs/cpu.md from results.jsonl (lines written by measure.sh).

    python docs/results/bench-step/table.py            # print it
    python docs/results/bench-step/table.py --docs docs/cpu.md   # put it between the markers
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- bench step pairs -->", "<!-- end -->"


def table(lines):
    out = ["| run (UTC) | commit | load before/after | 1 thread: ours / PyTorch | default threads: ours / PyTorch "
           "| 2 threads: ours / PyTorch |",
           "| --- | --- | --- | --- | --- | --- |"]
    for line in lines:
        r = json.loads(line)
        res = r["result"]
        rows = {row["threads"]: row for row in res["rows"]}
        two = next((row for row in res.get("scaling", []) if row["threads"] == 2), None)

        def pair(ours, theirs):
            return f"{ours * 1000:.0f} / {theirs * 1000:.0f} ms = **{ours / theirs:.2f}x**"

        cells = [pair(rows[k]["ours_seconds"], rows[k]["torch_seconds"]) for k in ("1 each", "default")]
        cells.append(pair(two["ours_seconds"], two["torch_seconds"]) if two and "torch_seconds" in two else "")
        out.append(f"| {r['label']}, {r['date_utc']} | {r['commit']} | {res['load_before']:.1f} / {res['load_after']:.1f} | "
                   + " | ".join(cells) + " |")
    first = json.loads(lines[0])
    out.append("")
    out.append(f"{first['cores']} cores ({first['cpu']}), NumPy {first['numpy']}, PyTorch {first['torch']}; "
               f"`minasgd bench step {first['flags']}`".replace(" `", " `").rstrip() + " (alexnet-mini, batch 128 unless the flags say otherwise); medians of 10 steps each, the two libraries taking turns.")
    return "\n".join(out)


def main(argv):
    text = table([l for l in (HERE / "results.jsonl").read_text().splitlines() if l.strip()])
    if len(argv) == 2 and argv[0] == "--docs":
        doc = Path(argv[1])
        old = doc.read_text()
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    else:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])

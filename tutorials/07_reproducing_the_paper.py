# %% [markdown]
# # Tutorial 7: the paper's idea in miniature: cold vs warm start, workers vs speed-up
#
# Paine et al. (2013) found that asynchronous SGD with several GPU clients speeds training up
# most when it starts from a partly trained model (**warm start**, up to ~3.2x with 8 clients),
# while many clients from random weights (**cold start**) can hurt: early on the gradients are
# large and change fast, so stale pushes from several clients pull the model in conflicting
# directions. Later, the landscape is smoother and staleness costs little.
#
# Here are both experiments at laptop scale, with the real commands:
#
# 1. pretrain one model in one process for a little while (`minasgd train --workers 0`);
# 2. train with 1 and with 2 async workers from random weights (cold start) and from the
#    pretrained model (warm start: `--init RUN/model.npz`), and compare test accuracy per
#    mini-batch;
# 3. the speed-up as the paper defines it: the time 1 worker needs to reach a target test
#    accuracy divided by the time 2 workers need (images per second alone is throughput, not
#    speed-up: stale updates can make more images necessary).
#
# The budgets are tiny, so the numbers are noisy and accuracies low: read them as a demo of
# the method, not as a result. `minasgd experiment workers|warmstart` runs the real versions.
# Run: `python tutorials/07_reproducing_the_paper.py` (about 30 s on 2 CPU cores).

# %%
import json
import os
import shutil
import subprocess
import sys

if shutil.which("nvidia-smi") is None:  # no GPU: any CUDA code would run on Numba's simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# One BLAS thread per training process (`_common` applies the rule of `minasgd/threads.py`,
# and `minasgd train` does the same in its workers): processes that each start a BLAS thread
# per core fight over a busy machine's cores (measured 5-10x slower on 2 shared cores).
# Set OPENBLAS_NUM_THREADS yourself to choose another count.

import _common as C  # noqa: E402
from minasgd.experiments import analysis  # noqa: E402

OUT = C.OUT / "07_runs"
shutil.rmtree(OUT, ignore_errors=True)
COMMON = ["--model", "tiny", "--backend", "numpy", "--batch-size", "32", "--lr", "0.02",
          "--dataset", f"shapes:{C.pick(640, 4000)},{C.pick(200, 1000)}",
          "--data-root", str(C.DATA_ROOT), "--quiet"]
PS = ["--async", "--nsync", "4", "--lr-scaling", "average",  # the paper's async workers (averaged pushes)
      "--checkpoint-every", "0", "--eval-every", "0.5"]


def train(name, *args):
    """Run `minasgd train ...` into OUT/name and return its summary.json."""
    cmd = [sys.executable, "-m", "minasgd", "train", *COMMON, *args, "--out", str(OUT / name)]
    print(f"$ minasgd train {' '.join(args)} ...")
    with C.Timer() as t:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-1000:], proc.stderr[-2000:])
        raise SystemExit(f"run {name} failed (exit {proc.returncode})")
    summary = json.loads((OUT / name / "summary.json").read_text())
    print(f"  {name}: test accuracy {summary['test_accuracy']:.1%}, {summary['steps']} mini-batches, "
          f"{summary['images_per_second']:.0f} images/s, {t.seconds:.0f} s")
    return summary


# %% [markdown]
# ## 1. Pretrain (one process)

# %%
pre = train("pretrain", "--workers", "0", "--epochs", str(C.pick(2, 4)))

# %% [markdown]
# ## 2. Cold vs warm start, with 1 and with 2 async workers
#
# Same data and the same number of mini-batches in every run; what differs is the starting
# point (random weights or the pretrained model) and the number of workers. The paper's
# cold-start result is a comparison of worker counts FROM RANDOM WEIGHTS: more clients did not
# help there, while from a warm start they did.

# %%
epochs = str(C.pick(2, 3))
init = ["--init", str(OUT / "pretrain" / "model.npz")]
runs = {
    ("cold", 1): train("cold-1", "--workers", "1", "--epochs", epochs, *PS),
    ("cold", 2): train("cold-2", "--workers", "2", "--epochs", epochs, *PS),
    ("warm", 1): train("warm-1", "--workers", "1", "--epochs", epochs, *init, *PS),
    ("warm", 2): train("warm-2", "--workers", "2", "--epochs", epochs, *init, *PS),
}
for (start, workers), s in runs.items():
    curve = ", ".join(f"{e['step']}: {e['test_accuracy']:.1%}" for e in s["evaluations"])
    stale = {int(k): v for k, v in s["staleness"].items()}
    mean = sum(k * v for k, v in stale.items()) / max(1, sum(stale.values()))
    print(f"  {start} start, {workers} worker(s): accuracy by mini-batch {{{curve}}}; mean staleness {mean:.2f}")

# %% [markdown]
# ## 3. Speed-up: time to a target accuracy
#
# For each start, the target is the lower of the two runs' best test accuracies, so both
# reach it; the time to reach it is read off the evaluations (interpolated, on the server's
# clock from when all workers had joined: `minasgd/experiments/analysis.py`). Then
#
#     speed-up = time for 1 worker to reach the target / time for 2 workers
#
# next to the throughput ratio (images/s), which is what a speed-up would be if staleness cost
# nothing. On a GPU cluster each worker has its own GPU and the throughput ratio approaches
# the number of workers until the server or the network saturates. On a laptop CPU two NumPy
# workers share the same few cores, so expect little or no speed-up here (and noisy numbers
# at these budgets: one seed, a few hundred mini-batches, a target near the end of the curves.
# A run can even come out the other way round from the paper). The point is the method.
# `minasgd experiment workers|warmstart` runs it with several seeds and reports the spread;
# docs/paper.md has our numbers next to the paper's.

# %%
speedups = {}
for start in ("cold", "warm"):
    curves = {w: analysis.load_curve(OUT / f"{start}-{w}") for w in (1, 2)}
    target = min(max(p["accuracy"] for p in curves[w]) for w in (1, 2))
    hits = {w: analysis.reach(curves[w], target) for w in (1, 2)}
    throughput = runs[(start, 2)]["images_per_second"] / runs[(start, 1)]["images_per_second"]
    speedup = hits[1]["time"] / max(hits[2]["time"], 1e-9)
    speedups[start] = (speedup, throughput, target)
    print(f"  {start} start, target {target:.1%}: 1 worker {hits[1]['time']:.1f} s ({hits[1]['images']:.0f} images), "
          f"2 workers {hits[2]['time']:.1f} s ({hits[2]['images']:.0f} images): speed-up {speedup:.2f}x "
          f"(throughput ratio {throughput:.2f}x)")

# %% [markdown]
# ## A picture: accuracy per mini-batch, and the speed-ups

# %%
plt = C.pyplot()
if plt is not None:
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    offset = pre["steps"]  # the warm runs' mini-batches come after the pretraining's
    for (start, workers), s in runs.items():
        shift = offset if start == "warm" else 0
        ax[0].plot([shift + e["step"] for e in s["evaluations"]], [100 * e["test_accuracy"] for e in s["evaluations"]],
                   "o-" if workers == 2 else "s--", label=f"{start} start, {workers} worker(s)")
    ax[0].axvline(offset, color="gray", linestyle=":", label="end of pretraining")
    ax[0].set_xlabel("mini-batches (warm runs: after the pretraining's)")
    ax[0].set_ylabel("test accuracy (%)")
    ax[0].legend(fontsize=7)
    names = [f"{start}\n(target {t:.0%})" for start, (_, _, t) in speedups.items()]
    xs = range(len(names))
    ax[1].bar([x - 0.2 for x in xs], [v[0] for v in speedups.values()], 0.4, label="speed-up (time to target)")
    ax[1].bar([x + 0.2 for x in xs], [v[1] for v in speedups.values()], 0.4, label="throughput ratio (images/s)")
    ax[1].set_xticks(list(xs), names)
    ax[1].axhline(1, color="gray", linewidth=0.5)
    ax[1].set_title(f"2 workers vs 1 on {os.cpu_count()} CPU cores", fontsize=9)
    ax[1].legend(fontsize=8)
    C.save(fig, "07_warm_start.png")
else:
    C.text_bars([f"{start} speed-up" for start in speedups], [v[0] for v in speedups.values()])
    C.text_bars([f"{start} images/s" for start in speedups], [v[1] for v in speedups.values()])
    C.no_plot("07_warm_start.png")

# %% [markdown]
# ## What to remember
# - Warm start: pretrain briefly in one process, then hand the model (`--init`) to many
#   asynchronous workers; staleness hurts least once the model is past its chaotic start.
# - Speed-up is time to a target accuracy (1 worker / N workers), not images per second:
#   staleness can make N workers need more images. It needs real parallel hardware: one GPU
#   per worker, as in the paper.
# - Everything here is a command you can scale up: more data, more epochs, `--backend cuda`.
print("\ntutorial 7 done")

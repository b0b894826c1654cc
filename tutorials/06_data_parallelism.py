# %% [markdown]
# # Tutorial 6: data parallelism with a parameter server (async SGD, staleness, nsync)
#
# The paper trains one model with several GPU "clients". Each has its own shard of the data
# and a copy of the parameters; a central **parameter server** holds the master copy. Every
# `nsync` mini-batches a client **pushes** what it learned since its last push and **fetches**
# fresh parameters. Pushes are applied the moment they arrive (**asynchronous** SGD), so a push
# may have been computed from parameters that other pushes have since changed: its
# **staleness** is the number of mini-batches the server applied in between.
#
# Files: `minasgd/ps/protocol.py` (the wire format), `server.py` (the rules, no sockets; its
# units: `update.py` the update rule, `sync.py` the sync round, `registry.py` the workers),
# `tcp.py` (the transport), `worker.py` (the client loop), `launcher.py` (`--workers N`).
# Run: `python tutorials/06_data_parallelism.py` (about 15 s; it starts worker processes).

# %%
import json
import os
import shutil
import socket
import subprocess
import sys

if shutil.which("nvidia-smi") is None:  # no GPU: any CUDA code would run on Numba's simulator
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# One BLAS thread per training process (`_common` applies the rule of `minasgd/threads.py`,
# and `minasgd train` does the same in its workers): processes that each start a BLAS thread
# per core fight over a busy machine's cores (measured 5-10x slower on 2 shared cores).
# Set OPENBLAS_NUM_THREADS yourself to choose another count.

import numpy as np  # noqa: E402

import _common as C  # noqa: E402
from minasgd.optim import learning_rate  # noqa: E402
from minasgd.ps import protocol  # noqa: E402
from minasgd.ps.server import ParameterServer, Refused  # noqa: E402

# %% [markdown]
# ## 1. The wire format
#
# Every message is a 32-byte header (magic, protocol version, message type, a count, the payload
# length, a sequence number, a parameter version) followed by the payload: raw little-endian
# float32 for parameters and gradients (sent straight from the NumPy buffer, received straight
# into one: no pickling, no copies), small JSON for everything else. Here is a PUSH going
# through a socket pair:

# %%
a, b = socket.socketpair()
grad = np.arange(6, dtype=np.float32) / 10
protocol.send_frame(a, protocol.Msg.PUSH, grad, seq=7, version=3, count=4)
frame = protocol.Receiver(b, max_payload=grad.nbytes).recv()
header = protocol.HEADER.pack(protocol.MAGIC, protocol.PROTOCOL, protocol.Msg.PUSH, 4, grad.nbytes, 7, 3)
print(f"header ({protocol.HEADER.size} bytes): {header.hex(' ', 4)}")
print(f"received {frame.type.name}: count {frame.count} mini-batches, computed from version {frame.version}, "
      f"seq {frame.seq}, payload {frame.floats(6)}")
a.close()
b.close()

# %% [markdown]
# ## 2. The server's rules, with two pretend workers
#
# `ParameterServer` is plain Python with one lock: a transport calls `join`, `fetch_into` and
# `push` from one thread per worker. Below, workers A and B both fetch version 0. A pushes
# first (staleness 0); by the time B pushes, the server has applied A's 4 mini-batches, so B's
# push is 4 mini-batches stale (staleness counts mini-batches, not updates). With
# `staleness_lr=True` a push of k mini-batches that is s stale moves k / (k + s) as far, a
# common fix (`--lr-scaling staleness`; the paper's answer is a warm start, tutorial 7).
#
# What a push holds: each worker runs single-process training's SGD with momentum locally, each
# step at the run's lr schedule for its step count, and pushes the sum of the steps it took:
# exactly the displacement it moved. The server subtracts that sum at a fixed scale, never
# rescaled by its own lr *now* (the schedule may have moved in between: during the warm-up
# another worker's push can raise it 20x). Async, as here and in the paper, `--lr-scaling average`
# applies 1/N of every push: the parameters move by the mean of the workers' displacements, model
# averaging, while each worker steps exactly as one process would; summing stale pushes instead
# (`--lr-scaling none`) loses accuracy per image (docs/paper.md, "Choosing the defaults"). One
# worker with nsync 1 follows one process's path bit for bit. `minasgd train --workers N` by
# default does not run async at all: it runs rounds (`--sync --nsync 1`), one mini-batch of every
# worker summed, which is one process's step on N times the batch at N times the lr; on a
# machine whose workers are equal, async saved little time and cost accuracy. The pretend
# server below keeps the scale 1 (the sum), and each pretend push is a displacement of 0.1 per
# parameter.

# %%
n = 5
ps = ParameterServer(np.zeros(n, np.float32), model_name="toy", fingerprint="toy:5", total_steps=100,
                     lr=0.1, momentum=0.0, staleness_lr=True)
wa, wb = ps.join("toy:5", {"name": "A"}), ps.join("toy:5", {"name": "B"})
buf = np.empty(n, np.float32)
va, _ = ps.fetch_into(wa, buf)
vb, _ = ps.fetch_into(wb, buf)
moved = np.full(n, 0.1, np.float32)  # what a worker's 4 local steps moved each parameter
ps.push(wa, moved, base_version=va, batches=4)  # fresh: moves 0.1
ps.push(wb, moved, base_version=vb, batches=4)  # 4 mini-batches stale: k / (k + s) = 4/8 of 0.1
ps.push(wa, moved, base_version=va, batches=4)  # A never re-fetched: 8 stale, 4/12 of 0.1
stats = ps.stats()
print(f"after 3 pushes: version {stats['version']}, {stats['steps']} mini-batches, staleness histogram {stats['staleness']}")
print(f"params now {ps.params} (-0.1 - 0.05 - 0.0333); the workers' lr at step 12: "
      f"{learning_rate(12, 100, 0.1):.4f} (the schedule they step with)")
try:
    ps.push(wa, np.full(n, np.nan, np.float32), base_version=0)
except Refused as e:
    print(f"a bad push is refused and changes nothing: {e}")

# %% [markdown]
# ## 3. A real run: a server and 2 worker processes
#
# `minasgd train --workers 2` starts the server (threads in this process) and two worker
# processes on this machine; each gets half the training images. A worker's loop
# (`minasgd/ps/worker.py`): fetch, then nsync times {gradient of a batch, local SGD step with
# momentum, add the step it took to a running sum}, then push the sum. `nsync` trades communication for staleness: pushing
# rarely sends less data but makes each push staler and lets workers drift apart.
#
# We run it as a command (what you would type), on the NumPy backend, small, asynchronous
# (`--async`: without it the server would wait for both workers every round, and no push would
# be stale).
# (Starting worker processes from a script needs an `if __name__ == "__main__":` guard,
# because each process re-imports the script; running the command avoids that here.)

# %%
out = C.OUT / "06_ps_run"
shutil.rmtree(out, ignore_errors=True)
cmd = [sys.executable, "-m", "minasgd", "train", "--workers", "2", "--async", "--nsync", "4", "--lr-scaling", "average",
       "--model", "tiny",
       "--backend", "numpy", "--batch-size", "32", "--epochs", str(C.pick(2, 3)),
       "--dataset", f"shapes:{C.pick(640, 4000)},{C.pick(200, 1000)}",  # a small shapes set, drawn once
       "--data-root", str(C.DATA_ROOT), "--out", str(out), "--quiet", "--checkpoint-every", "0"]
print("$ minasgd " + " ".join(cmd[3:]))
with C.Timer() as t:
    proc = subprocess.run(cmd, capture_output=True, text=True)
print(proc.stdout.strip()[-600:])
if proc.returncode != 0:
    print(proc.stderr[-2000:])
    raise SystemExit(f"minasgd train --workers 2 failed (exit {proc.returncode})")
summary = json.loads((out / "summary.json").read_text())
hist = {int(k): v for k, v in summary["staleness"].items()}
print(f"{summary['workers']} workers, {summary['pushes']} pushes, {summary['steps']} mini-batches in {t.seconds:.0f} s "
      f"(including process start-up); test accuracy {summary['test_accuracy']:.1%}")
for w in summary["worker_stats"]:
    print(f"  worker {w['id']} ({w['name']}): {w['pushes']} pushes, {w['fetches']} fetches, "
          f"last staleness {w['last_staleness']}")
applied = sum(w["pushes"] for w in summary["worker_stats"])  # the server's count per worker: applied pushes
print(f"the server received {summary['pushes'] + summary['discarded']} pushes: it applied {summary['pushes']} "
      f"({' + '.join(str(w['pushes']) for w in summary['worker_stats'])} by worker) and discarded "
      f"{summary['discarded']}, a push that arrived after the last scheduled mini-batch (training was "
      "over; its reply told the worker to stop)")
assert applied == summary["pushes"]
print(f"staleness of the applied pushes: {dict(sorted(hist.items()))}")

# %% [markdown]
# ## A picture: the staleness histogram
#
# Staleness counts mini-batches: with 2 workers pushing alternately at nsync 4, most pushes
# miss the other worker's push, 4 mini-batches. With N workers expect about (N - 1) x nsync.

# %%
plt = C.pyplot()
ks = sorted(hist)
if plt is not None:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(ks, [hist[k] for k in ks], color="tab:purple")
    ax.set_xlabel("staleness (mini-batches applied since the fetch)")
    ax.set_ylabel("pushes")
    ax.set_xticks(ks)
    ax.set_title(f"{summary['workers']} async workers, nsync {summary['nsync']}")
    C.save(fig, "06_staleness.png")
else:
    C.text_bars(ks, [hist[k] for k in ks])
    C.no_plot("06_staleness.png")

# %% [markdown]
# ## What to remember
# - Data parallelism: same model, different data; a parameter server keeps the master copy.
# - Async SGD applies pushes as they come: no waiting, but gradients are stale.
# - nsync sets how often workers talk: less traffic versus staler, more divergent updates.
# - On several machines: `minasgd serve` on one, `minasgd work --server HOST:PORT` on the others.
#
# Next: tutorial 7, the paper's experiments in miniature.
print("\ntutorial 6 done")

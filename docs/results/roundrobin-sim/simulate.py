"""A round-robin simulation of N asynchronous workers in ONE process, on the digits set
(`python docs/results/digits_as_cifar10.py data/digits-cifar10` makes it), 3 epochs by default.

Workers take turns: worker i fetches the server's parameters, takes k = nsync local SGD steps
on its own shard (momentum `mw`, lr = the run's schedule x `lrf`), and the server subtracts
`wlr` x what it moved. So a push is exactly (N - 1) x k mini-batches stale, with no sockets, no
load and no timing noise: what is left is the update rule. It prints one JSON line per run (the
test accuracy after each epoch). key=value arguments (defaults in `a` below):
  N workers, k nsync, mw each worker's momentum, lrf factor on the worker's lr, sync 1 = rounds
  from the same parameters, ahead = fetch w minus that many of the others' last pushes (a
  look-ahead), mserver 1 = one momentum 0.9 on the server (workers push lr x gradient sums),
  wlr = the fraction of a push the server applies (0.5 with 2 workers: the average), bs batch,
  epochs, warm warm-up steps, lr peak lr, seed.
Run from the repository root: `python docs/results/roundrobin-sim/simulate.py N=2 k=4 wlr=0.5 seed=0`
(`run_grid.sh` runs every line of grid.txt for seeds 0, 1, 2; `table.py` makes the table).
"""
import sys, json, numpy as np
from minasgd import backends, data
from minasgd.model import Model
from minasgd.train import TrainConfig, load_dataset, prepare_batch, evaluate
from minasgd.optim import Schedule
a = dict(N=2, k=4, mw=0.9, lrf=1.0, sync=0, ahead=0.0, seed=0, epochs=3, mserver=0, lr=0.02, warm=100, wlr=1.0, bs=64)
for kv in sys.argv[1:]:
    key, val = kv.split("="); a[key] = type(a[key])(float(val)) if key not in ("N","k","sync","seed","epochs","mserver","warm","bs") else int(val)
N, k, seed = a["N"], a["k"], a["seed"]
be = backends.get("numpy")
ds = load_dataset(TrainConfig(dataset="cifar10", data_root="data/digits-cifar10", quiet=True))
model = Model("alexnet-mini", be, seed=seed)
w = model.get_params().copy()
per_epoch = len(ds.train_y) // (64 * a["bs"] // 64)
steps = a["epochs"] * per_epoch
sched = Schedule(base_lr=a["lr"], total_steps=steps, warmup_steps=a["warm"])
shards = [ds.shard(i, N) for i in range(N)]
rngs = [np.random.default_rng(seed + 1000 * i) for i in range(N)]
def gen(i):
    while True:
        yield from data.batches(shards[i].train_x, shards[i].train_y, a["bs"], rngs[i], drop_last=True)
gens = [gen(i) for i in range(N)]
fetched = [w.copy() for _ in range(N)]
vel = [np.zeros_like(w) for _ in range(N)]
svel = np.zeros_like(w)
last = [np.zeros_like(w) for _ in range(N)]
t = 0; r = 0; curve = []; next_eval = per_epoch
def local_round(i, t0):
    wl = fetched[i].copy(); disp = np.zeros_like(w); n = 0
    for _ in range(min(k, steps - t0)):
        model.set_params(wl)
        x, y = next(gens[i]); xb, yb = prepare_batch(be, model, x, y)
        model.seed = seed + 1000 * i
        model.loss_and_grad(xb, yb, t0 + n)
        g = be.to_numpy(model.grads).copy() + 5e-4 * wl
        lr = sched(t0 + n) * a["lrf"]
        if a["mserver"]:
            d = lr * g
        else:
            vel[i] = a["mw"] * vel[i] + g; d = lr * vel[i]
        wl -= d; disp += d; n += 1
    return disp, n
while t < steps:
    if a["sync"]:
        outs = [local_round(i, t) for i in range(N)]
        disp = sum(o[0] for o in outs) * a["wlr"]; n = sum(o[1] for o in outs)
        w = w - disp; t += n
        for i in range(N): fetched[i] = w.copy()
    else:
        i = r % N; r += 1
        disp, n = local_round(i, t)
        if a["mserver"]:
            svel = 0.9 * svel + disp; disp = svel
        w = w - disp * a["wlr"]; last[i] = disp; t += n
        ahead = sum(last[j] for j in range(N) if j != i) if a["ahead"] else 0
        fetched[i] = (w - a["ahead"] * ahead).astype(np.float32)
    if t >= next_eval:
        model.set_params(w); curve.append(round(evaluate(model, ds.test_x, ds.test_y)[0], 3)); next_eval += per_epoch
print(json.dumps({**a, "curve": curve, "acc": curve[-1]}), flush=True)

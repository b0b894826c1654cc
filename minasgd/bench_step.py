"""`minasgd bench step`: time one training step (forward + backward + SGD update) of a net.

Our step on the chosen backend vs the identical PyTorch net (when PyTorch is installed),
measured in the same run on the same inputs, the two alternating sample by sample, so the
ratio means something even on a shared, noisy machine.

On the CPU it runs twice: with one thread each (the fair per-core comparison, and what every
worker of a CPU run uses), then with each library's default thread count (ours: every core, as a
lone `minasgd train` on an idle machine runs it).
Each row also gives the step's GFLOP/s (multiply-adds count 2; forward, weight and input
gradients of every conv and fc layer, the first layer's input gradient excluded) and, on the
CPU, the yardstick to read it against: the GFLOP/s of one large float32 matrix product through
NumPy's BLAS at the same thread count (`blas_peak_gflops`), near what the cores can do.
`measure` returns the numbers; the command line shows them (`minasgd.dashboard.show_bench_step`).

On the CPU it then times each side at 1, 2, ... N threads (N: the cores this process is given;
ours: the compiled loops of `cpu_loops` and the convolutions' image chunks on that many
threads, BLAS on one, as `minasgd.threads` runs a step), each against its own best
time: the scaling table. The machine's load average goes with the numbers, since a shared
machine's other processes decide how much a second thread can get.
"""

import os

import contextlib
import time

import numpy as np

from . import backends, torch_reference
from .model import Model
from .optim import SGD
from .backends import cpu_loops
from .threads import blas_threads, cores, limit_blas_threads


def step_flops(model, batch_size):
    """FLOPs of one training step: forward + weight gradient + input gradient (not the first layer's)."""
    per_image = [layer.flops() for layer in model.layers]
    first = next(f for f in per_image if f)
    return batch_size * (3 * sum(per_image) - first)


def blas_peak_gflops(size=1536, repeats=3):
    """GFLOP/s of NumPy's BLAS on one large square float32 product (the best of `repeats`), at the
    current thread count: what this machine's cores reach on pure multiply-adds, as a yardstick."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size)).astype(np.float32) for _ in range(2))
    out = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats + 1):  # the first one warms up
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def _median_times(steps, repeats):
    """{name: (median wall seconds, median CPU seconds)}; the steps take turns `repeats` times.

    Each turn runs its step twice and times the second: a multi-threaded library leaves its
    threads spinning for a while after a call (OpenBLAS's and PyTorch's OpenMP pools both do),
    and a step timed right after the OTHER library's step shares the cores with those spinning
    threads. Untimed, the first run lets them go to sleep, so each library is timed in its own
    steady state, as in a training loop that uses only it. CPU time is this process's, all
    threads together: with one thread each it is the work itself, which a busy machine disturbs
    much less than wall time.
    """
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            step()  # warms up, and lets the other library's threads settle
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {name: tuple(float(v) for v in np.median(np.array(t), axis=0)) for name, t in times.items()}


def _ours(be, model_name, x_np, y_np):
    model = Model(model_name, be, seed=0)
    x, y = be.asarray(x_np), be.asarray(y_np)
    opt = SGD(be, model.num_params, momentum=0.9, weight_decay=5e-4)
    counter = iter(range(10**9))

    def step():
        model.loss_and_grad(x, y, next(counter))
        opt.step(model.params, model.grads, 0.01)
        be.synchronize()

    return model, step


def _theirs(model, device, x_np, y_np):
    import torch

    net = torch_reference.build(model, device)
    topt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    tx = torch.from_numpy(x_np).to(device)
    ty = torch.from_numpy(y_np.astype(np.int64)).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        topt.zero_grad(set_to_none=True)
        loss_fn(net(tx), ty).backward()
        topt.step()
        sync()

    return step


@contextlib.contextmanager
def _our_threads(n):
    """Our step on n threads (None: every core), as `minasgd train` runs it: the compiled loops
    and the convolutions' image chunks split over n threads, BLAS on one (`minasgd.threads`)."""
    before = cpu_loops.threads()
    cpu_loops.use_threads(n or cores())
    try:
        with limit_blas_threads(1):
            yield
    finally:
        cpu_loops.use_threads(before)


def _blas_peak_at(n, peak_size):
    """The BLAS peak with n BLAS threads (None: BLAS's default): the yardstick of a step on n threads."""
    with limit_blas_threads(n):
        return blas_peak_gflops(peak_size)


def measure(backend="numpy", model_name="alexnet-mini", batch_size=128, repeats=10, device=None, peak_size=1536,
            scaling=True):
    """{"backend", "device", "model", "batch_size", "step_gflop", "first_step_seconds", "rows": [...]}.

    Each row: "threads" ("1 each" or "default"), "ours_seconds", "ours_cpu_seconds", "ours_gflops",
    "blas_threads", on the CPU "blas_peak_gflops", and with PyTorch: "torch_seconds", "torch_cpu_seconds", "torch_gflops",
    "torch_threads", "ratio_ours_over_torch", "cpu_ratio_ours_over_torch" (medians; GFLOP/s from wall time).
    On the CPU with `scaling`, also "scaling": one row per thread count 1..cores, "ours_seconds",
    "ours_over_best" (this time / our best time over the counts), and with PyTorch the same for it;
    and "cores", "load_before", "load_after": the 1-minute load average around the whole measurement.
    """
    load_before = os.getloadavg()[0]
    be = backends.get(backend, device)
    rng = np.random.default_rng(0)
    probe = Model(model_name, backends.get("numpy-reference"), seed=0)
    x_np = rng.standard_normal((batch_size, *probe.input_shape)).astype(np.float32)
    y_np = rng.integers(0, probe.num_classes, batch_size).astype(np.int32)
    flops = step_flops(probe, batch_size)
    model, ours = _ours(be, model_name, x_np, y_np)
    t0 = time.perf_counter()
    with limit_blas_threads(1 if be.NAME != "cuda" else None):  # default threads may thrash: see the rows
        ours()
    result = {"backend": be.NAME, "device": be.DEVICE, "model": model_name, "batch_size": batch_size,
              "step_gflop": flops / 1e9, "first_step_seconds": time.perf_counter() - t0, "rows": []}

    torch = None
    if torch_reference.available():
        import torch

        tdev = "cuda" if be.NAME == "cuda" else "cpu"
        if tdev == "cuda" and not torch.cuda.is_available():
            torch = None
    default_torch_threads = torch.get_num_threads() if torch is not None else None
    settings = [("1 each", 1), ("default", None)] if be.NAME != "cuda" else [("default", None)]
    for label, n in settings:
        steps = {"ours": ours}
        if torch is not None:
            torch.set_num_threads(n or default_torch_threads)
            steps["torch"] = _theirs(model, tdev, x_np, y_np)
        with _our_threads(n):
            t = _median_times(steps, repeats)
            row = {"threads": label, "our_threads": cpu_loops.threads(), "blas_threads": blas_threads(),
                   "ours_seconds": t["ours"][0], "ours_cpu_seconds": t["ours"][1], "ours_gflops": flops / t["ours"][0] / 1e9}
        if be.NAME != "cuda":
            row["blas_peak_gflops"] = _blas_peak_at(n, peak_size)
        if torch is not None:
            row.update(torch_seconds=t["torch"][0], torch_cpu_seconds=t["torch"][1],
                       torch_gflops=flops / t["torch"][0] / 1e9, torch_device=tdev,
                       torch_threads=torch.get_num_threads(), ratio_ours_over_torch=t["ours"][0] / t["torch"][0],
                       cpu_ratio_ours_over_torch=t["ours"][1] / t["torch"][1])
        result["rows"].append(row)
    if scaling and be.NAME != "cuda":
        result["scaling"] = _scaling(ours, model, x_np, y_np, torch, repeats, flops, peak_size)
    if torch is not None:
        torch.set_num_threads(default_torch_threads)
    result["cores"], result["load_before"], result["load_after"] = cores(), load_before, os.getloadavg()[0]
    return result


def _scaling(ours, model, x_np, y_np, torch, repeats, flops, peak_size):
    """Rows of the scaling table: each side at 1..cores threads, against its own best, and its
    GFLOP/s as a share of NumPy's BLAS peak at that thread count."""
    rows = []
    for n in range(1, cores() + 1):
        steps = {"ours": ours}
        if torch is not None:
            torch.set_num_threads(n)
            steps["torch"] = _theirs(model, "cpu", x_np, y_np)
        with _our_threads(n):
            t = _median_times(steps, repeats)
        peak = _blas_peak_at(n, peak_size)
        row = {"threads": n, "ours_seconds": t["ours"][0], "blas_peak_gflops": peak,
               "ours_of_peak": flops / t["ours"][0] / 1e9 / peak}
        if torch is not None:
            row.update(torch_seconds=t["torch"][0], torch_of_peak=flops / t["torch"][0] / 1e9 / peak)
        rows.append(row)
    for side in ("ours", "torch"):
        if all(f"{side}_seconds" in row for row in rows):
            best = min(row[f"{side}_seconds"] for row in rows)
            for row in rows:
                row[f"{side}_over_best"] = row[f"{side}_seconds"] / best
    return rows


def scaling_markdown(result):
    """The scaling table as markdown (docs/cpu.md is made of it: never typed)."""
    torch = any("torch_seconds" in row for row in result["scaling"])
    lines = [f"`minasgd bench step --model {result['model']} --batch-size {result['batch_size']}`, "
             f"{result['cores']} cores given, 1-minute load average {result['load_before']:.1f} before, "
             f"{result['load_after']:.1f} after:", "",
             "| threads | BLAS peak GFLOP/s | minasgd ms / step | vs its best | of BLAS peak |"
             + (" PyTorch ms / step | vs its best | of BLAS peak |" if torch else ""),
             "|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if torch else "")]
    for row in result["scaling"]:
        line = (f"| {row['threads']} | {row['blas_peak_gflops']:.0f} | {row['ours_seconds'] * 1e3:.1f} | "
                f"{row['ours_over_best']:.2f}x | {row['ours_of_peak']:.0%} |")
        if torch:
            line += f" {row['torch_seconds'] * 1e3:.1f} | {row['torch_over_best']:.2f}x | {row['torch_of_peak']:.0%} |"
        lines.append(line)
    if not torch:
        lines += ["", "PyTorch baseline unavailable (not installed): only our own scaling."]
    return "\n".join(lines) + "\n"

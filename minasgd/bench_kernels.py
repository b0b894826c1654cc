"""`minasgd bench kernels [--json]`: time every hand-written kernel at alexnet-mini sizes.

For each op at the sizes one training step of alexnet-mini uses (batch 128):
  * the steady-state time of the version the cuda backend uses (median of several samples,
    each a few calls between `cuda.synchronize()`s, after a warm-up call that compiles),
  * its rate: GFLOP/s for convolutions and matrix multiplies, GB/s for memory-bound ops,
  * the other version where there is one (the naive conv and GEMM, the gather pool backward)
    (every version is validated against the reference by `python -m minasgd.kernels.<op>`)
    and the speed-up of ours over it,
  * with PyTorch on a GPU: the cuDNN / cuBLAS / ATen equivalent timed in the same run, and
    ours / torch (above 1 means ours is slower).
It also reports the first call of one kernel (JIT compile, or loading numba's on-disk cache)
against its steady state.

Timings need a real NVIDIA GPU. Under the CUDA simulator, or without a GPU, `run` returns one
line saying so and times nothing: simulator timings are meaningless.

`minasgd bench kernels --static` needs no GPU: every kernel and version, compiled offline for
sm_80 (A100) and sm_90 (H100) (see `minasgd.kernels.resources`): registers per thread, static
shared memory, spills, the block size its launcher uses, and the theoretical occupancy those
allow. docs/gpu.md explains the numbers and which kernel is limited by what.

`minasgd bench kernels --simulated` needs no GPU either: every case (ours and the other version)
at the tiny shapes of Model("micro"), batch 2, launched on the CUDA simulator under
`minasgd.kernels.memprofile`, which models from the addresses each warp touches the global
sectors per request, coalescing efficiency, shared-memory bank conflicts, bytes moved and a
roofline bound on an H200 (`simulated_result`).
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .timer import median_seconds

BATCH = 128

MODEL = "alexnet-mini"  # the shapes come from Model(MODEL) (minasgd.workbench.layer_shapes), not a copy


@dataclass
class Case:
    """One row of the table: an op at one size, our version and what it is compared with."""

    name: str
    shape: str
    work: float  # floating-point operations, or bytes moved for memory-bound ops
    unit: str  # "GFLOP/s" or "GB/s"
    ours: Callable[[], object]
    alt: Optional[Callable[[], object]] = None
    alt_name: str = ""
    torch: Optional[Callable[[], object]] = None
    results: dict = field(default_factory=dict)


def _shape(*dims):
    return "x".join(str(d) for d in dims)


def build_cases(model=MODEL, batch=BATCH, torch_device=None, tile=None):
    """Every benchmark case at the shapes one training step of `model` uses, with device inputs
    and preallocated outputs ready.

    `torch_device` ("cuda", or "cpu" to check the calls without a GPU) adds the PyTorch
    equivalents; None leaves them out. `tile` overrides the tile size of the tiled kernels.
    """
    from numba import cuda

    from minasgd.backends import cuda_backend as be
    from minasgd.kernels import conv, elementwise, gemm, optim, pool, reduce, shapes, softmax
    from minasgd.workbench import layer_shapes

    net = layer_shapes(model, batch)

    torch = F = None
    if torch_device is not None:
        import torch
        import torch.nn.functional as F

        torch.backends.cudnn.benchmark = True

    rng = np.random.default_rng(0)
    ct = {} if tile is None else {"tile": tile}  # tile size for the tiled conv and GEMM kernels

    def dev(*shape):
        return cuda.to_device(rng.standard_normal(shape).astype(np.float32))

    def tdev(*shape):
        return torch.randn(*shape, device=torch_device)

    cases = []
    for layer in net["conv"]:
        name, (_, c, h, w), (k, _, r, _), cs, pad = layer["name"], layer["x"], layer["w"], layer["stride"], layer["pad"]
        x, wt, b = dev(batch, c, h, w), dev(k, c, r, r), dev(k)
        y_shape = shapes.conv2d_output_shape(x.shape, wt.shape, cs, pad)
        y, dx, dw, db = (cuda.device_array(s, np.float32) for s in (y_shape, x.shape, wt.shape, (k,)))
        dy = dev(*y_shape)
        flops = 2.0 * np.prod(y_shape) * c * r * r
        label = f"{_shape(batch, c, h, w)} * {_shape(k, c, r, r)} pad {pad}" + (f" stride {cs}" if cs != 1 else "")
        t = {}
        if torch is not None:
            tx, tw, tb, tdy = tdev(batch, c, h, w), tdev(k, c, r, r), tdev(k), tdev(*y_shape)

            def t_backward(mask, tx=tx, tw=tw, tdy=tdy, pad=pad, k=k, cs=cs):
                return torch.ops.aten.convolution_backward(tdy, tx, tw, [k], [cs, cs], [pad, pad], [1, 1], False, [0, 0], 1, mask)

            t = dict(
                fwd=lambda tx=tx, tw=tw, tb=tb, pad=pad, cs=cs: F.conv2d(tx, tw, tb, cs, pad),
                data=lambda f=t_backward: f([True, False, False]),
                filt=lambda f=t_backward: f([False, True, True]),
            )
        cases += [
            Case(f"{name} forward", label, flops, "GFLOP/s",
                 lambda x=x, wt=wt, b=b, y=y, pad=pad, cs=cs: conv.conv2d_forward(x, wt, b, cs, pad, out=y, version="tiled", **ct),
                 lambda x=x, wt=wt, b=b, y=y, pad=pad, cs=cs: conv.conv2d_forward(x, wt, b, cs, pad, out=y, version="naive"),
                 "naive", t.get("fwd")),
            Case(f"{name} backward data", label, flops, "GFLOP/s",
                 lambda dy=dy, wt=wt, dx=dx, pad=pad, cs=cs: conv.conv2d_backward_data(dy, wt, dx.shape, cs, pad, out=dx),
                 lambda dy=dy, wt=wt, dx=dx, pad=pad, cs=cs: conv.conv2d_backward_data(dy, wt, dx.shape, cs, pad, out=dx, version="naive"),
                 "naive", t.get("data")),
            Case(f"{name} backward filter+bias", label, flops + 4.0 * np.prod(y_shape), "GFLOP/s",
                 lambda dy=dy, x=x, dw=dw, db=db, pad=pad, cs=cs: (conv.conv2d_backward_filter(dy, x, dw.shape, cs, pad, out=dw, **ct),
                                                                   reduce.sum_over_batch(dy, out=db)),
                 lambda dy=dy, x=x, dw=dw, db=db, pad=pad, cs=cs: (conv.conv2d_backward_filter(dy, x, dw.shape, cs, pad, out=dw, version="naive"),
                                                                   reduce.sum_over_batch(dy, out=db)),
                 "naive", t.get("filt")),
        ]

    for layer in net["pool"]:
        name, y_shape, size, stride = layer["name"], layer["x"], layer["size"], layer["stride"]
        y = dev(*y_shape)  # the pool's input: a conv layer's (ReLU'd) output
        p_shape = shapes.pool2d_output_shape(y_shape, size, stride)
        py, parg, pdy, pdx = (cuda.device_array(p_shape, np.float32), cuda.device_array(p_shape, np.int32),
                              dev(*p_shape), cuda.device_array(y_shape, np.float32))
        pool.maxpool2d_forward(y, size, stride, out=py, out_argmax=parg)  # valid argmax for backward
        pool_bytes = 4.0 * np.prod(y_shape) + 8.0 * np.prod(p_shape)
        tp = {}
        if torch is not None:
            ty = tdev(*y_shape)
            _, tidx = F.max_pool2d(ty, size, stride, return_indices=True)
            tpdy = tdev(*p_shape)
            tp = dict(
                fwd=lambda ty=ty, size=size, stride=stride: F.max_pool2d(ty, size, stride, return_indices=True),
                bwd=lambda ty=ty, tidx=tidx, tpdy=tpdy, size=size, stride=stride: torch.ops.aten.max_pool2d_with_indices_backward(
                    tpdy, ty, [size, size], [stride, stride], [0, 0], [1, 1], False, tidx),
            )
        pool_name = name
        plabel = f"{_shape(*y_shape)} window {size} stride {stride}"
        cases += [
            Case(f"{pool_name} forward", plabel, pool_bytes, "GB/s",
                 lambda y=y, py=py, parg=parg, size=size, stride=stride: pool.maxpool2d_forward(y, size, stride, out=py, out_argmax=parg),
                 torch=tp.get("fwd")),
            Case(f"{pool_name} backward", plabel, pool_bytes + 4.0 * np.prod(y_shape), "GB/s",
                 lambda pdy=pdy, parg=parg, pdx=pdx: pool.maxpool2d_backward(pdy, parg, pdx.shape, out=pdx),
                 lambda pdy=pdy, parg=parg, pdx=pdx, size=size, stride=stride: pool.maxpool2d_backward_gather(pdy, parg, pdx.shape, size, stride, out=pdx),
                 "gather", tp.get("bwd")),
        ]

    for layer in net["fc"]:
        name, (_, d), (m, _) = layer["name"], layer["x"], layer["w"]
        x, wt, b, dy = dev(batch, d), dev(m, d), dev(m), dev(batch, m)
        y, dx, dw = (cuda.device_array(s, np.float32) for s in ((batch, m), (batch, d), (m, d)))
        flops = 2.0 * batch * d * m
        tl = {}
        if torch is not None:
            tx, tw, tb, tdy = tdev(batch, d), tdev(m, d), tdev(m), tdev(batch, m)
            tl = dict(fwd=lambda tx=tx, tw=tw, tb=tb: F.linear(tx, tw, tb),
                      data=lambda tdy=tdy, tw=tw: tdy @ tw,
                      weight=lambda tdy=tdy, tx=tx: tdy.t() @ tx)
        for what, args, out, tkey in (
            ("forward y = x w^T + b", (x, wt, False, True, b), y, "fwd"),
            ("backward dx = dy w", (dy, wt, False, False, None), dx, "data"),
            ("backward dw = dy^T x", (dy, x, True, False, None), dw, "weight"),
        ):
            cases.append(Case(
                f"{name} {what}", f"{_shape(batch, d)} -> {_shape(batch, m)}", flops, "GFLOP/s",
                lambda args=args, out=out: gemm.gemm(*args[:2], args[2], args[3], bias=args[4], out=out, version="tiled", **ct),
                lambda args=args, out=out: gemm.gemm(*args[:2], args[2], args[3], bias=args[4], out=out, version="naive"),
                "naive", tl.get(tkey)))

    # Elementwise ops over the largest activation, the loss, and one optimizer step.
    largest = net["largest"]
    a, a_out, a_dy = dev(largest), cuda.device_array(largest, np.float32), dev(largest)
    classes = net["classes"]
    logits, dlogits = dev(batch, classes), cuda.device_array((batch, classes), np.float32)
    labels = cuda.to_device(rng.integers(0, classes, batch).astype(np.int32))
    n_params = net["num_params"]
    pw, pg, pv = dev(n_params), dev(n_params), be.zeros((n_params,))
    te = {}
    if torch is not None:
        ta, tady, tlog = tdev(largest), tdev(largest), tdev(batch, classes)
        tlab = torch.randint(0, classes, (batch,), device=torch_device)
        tpw, tpg, tpv = tdev(n_params), tdev(n_params), torch.zeros(n_params, device=torch_device)

        def t_softmax_xent():  # loss and its gradient, like ours
            tlog.requires_grad_(True)
            loss = F.cross_entropy(tlog, tlab)
            return loss.detach(), torch.autograd.grad(loss, tlog)[0]

        def t_sgd():
            tpv.mul_(0.9).add_(tpg).add_(tpw, alpha=5e-4)
            tpw.add_(tpv, alpha=-0.01)

        te = dict(
            relu=lambda: F.relu(ta),
            relu_bwd=lambda: torch.ops.aten.threshold_backward(tady, ta, 0.0),
            dropout=lambda: F.dropout(ta, 0.5, training=True),
            softmax=t_softmax_xent,
            sgd=t_sgd,
        )
    cases += [
        Case("relu forward", _shape(largest), 8.0 * largest, "GB/s",
             lambda: elementwise.relu_forward(a, out=a_out), torch=te.get("relu")),
        Case("relu backward", _shape(largest), 12.0 * largest, "GB/s",
             lambda: elementwise.relu_backward(a_dy, a, out=a_out), torch=te.get("relu_bwd")),
        Case("dropout p=0.5", _shape(largest), 8.0 * largest, "GB/s",
             lambda: elementwise.dropout(a, 0.5, 1234, out=a_out), torch=te.get("dropout")),
        Case("softmax + cross-entropy", _shape(batch, classes), 8.0 * batch * classes + 4.0 * batch, "GB/s",
             lambda: softmax.softmax_cross_entropy(logits, labels, out=dlogits), torch=te.get("softmax")),
        Case("sgd momentum + decay", f"{n_params:,} params", 20.0 * n_params, "GB/s",
             lambda: optim.sgd_update(pw, pg, pv, 0.01, 0.9, 5e-4), torch=te.get("sgd")),
    ]
    return cases


# ---------------------------------------------------------------- timing

def _sync(torch_fn=None):
    from numba import cuda

    cuda.synchronize()
    if torch_fn is not None:
        import torch

        torch.cuda.synchronize()


def time_call(fn, samples=7, calls=5, is_torch=False):
    """Median seconds per call: one warm-up call, then `samples` timings of `calls` back-to-back calls."""
    return median_seconds(fn, repeats=samples, calls=calls, sync=(lambda: _sync(True)) if is_torch else _sync)


def first_call_vs_steady(cases):
    """First call of the first case (compile or cache load, plus the launch) against its steady state."""
    case = cases[0]
    _sync()
    start = time.perf_counter()
    case.ours()
    _sync()
    first = time.perf_counter() - start
    steady = time_call(case.ours)
    return {"kernel": case.name, "first_call_s": first, "steady_s": steady}


SWEPT = ("conv2 forward", "fc1 forward y = x w^T + b")


def tile_sweep(tiles=None, model=MODEL, batch=BATCH):
    """The SWEPT kernels with tile x tile thread blocks, for each tile size."""
    from minasgd.kernels.common import TILES

    rows = []
    for tile in tiles or TILES:  # the compile check covers exactly these tile sizes
        row = {"tile": tile}
        for case in build_cases(model, batch, tile=tile):
            if case.name in SWEPT:
                seconds = time_call(case.ours)
                row[case.name] = {"ms": seconds * 1e3, "rate": case.work / seconds / 1e9}
        rows.append(row)
    return rows


def _torch_device():
    try:
        import torch
    except ImportError:
        return None
    return "cuda" if torch.cuda.is_available() else None


def no_gpu_reason():
    """Why GPU timings cannot be taken here, or None when they can."""
    from numba import config

    from minasgd.backends import cuda_available

    if config.ENABLE_CUDASIM:
        return "GPU timings need a real GPU: NUMBA_ENABLE_CUDASIM is set, and simulator timings are meaningless; nothing was timed."
    if not cuda_available():
        return "GPU timings need a real NVIDIA GPU, and numba sees none here; nothing was timed."
    return None


# ---------------------------------------------------------------- static: what the hardware sees

STATIC_ARCHS = ("sm_80", "sm_90")
PER_ARCH = ("registers", "smem", "spill_stores", "spill_loads", "f64", "blocks_per_sm", "active_warps",
            "max_warps", "occupancy", "limit", "error")


def static_rows(archs=STATIC_ARCHS):
    """One row per kernel and version (and tile size): threads per block, and per arch the
    registers, static shared memory, spills, float64 instructions and theoretical occupancy.
    Compiles offline (no GPU needed; NVVM and ptxas are: raises `resources.ToolchainMissing`)."""
    from minasgd.kernels import resources

    rows = {}
    for r in resources.report(archs):
        row = rows.setdefault(r["name"], {"kernel": r["name"], "version": r["version"], "threads": r["threads"],
                                          "argtypes": r["argtypes"], "archs": {}})
        row["archs"][r["arch"]] = {k: r[k] for k in PER_ARCH if k in r}
    return list(rows.values())


def static_result():
    """`--static`: {"archs", "kernels": static_rows()}, or {"skipped": why} without the offline compiler.
    `minasgd.dashboard.show_kernel_static` draws it."""
    from minasgd.kernels import resources

    try:
        return {"archs": list(STATIC_ARCHS), "kernels": static_rows()}
    except resources.ToolchainMissing as e:
        return {"skipped": str(e)}


# ---------------------------------------------------------------- run

def run(backend_device=None):
    """Time every kernel (see the module docstring); returns the results as a JSON-able dict
    ({"skipped": why} where nothing can be timed). `minasgd.dashboard.show_bench_kernels` draws them."""
    reason = no_gpu_reason()
    if reason:
        return {"skipped": reason}

    from minasgd.backends import cuda_backend

    device = cuda_backend.select_device(backend_device)
    torch_device = _torch_device()
    cases = build_cases(torch_device=torch_device)
    compile_info = first_call_vs_steady(cases)
    rows = []
    for case in cases:
        ours = time_call(case.ours)
        row = {"kernel": case.name, "shape": case.shape, "ours_ms": ours * 1e3,
               "rate": case.work / ours / 1e9, "unit": case.unit}
        if case.alt is not None:
            alt = time_call(case.alt)
            row.update(alt_version=case.alt_name, alt_ms=alt * 1e3, speedup_vs_alt=alt / ours)
        if case.torch is not None:
            t = time_call(case.torch, is_torch=True)
            row.update(torch_ms=t * 1e3, ours_over_torch=ours / t)
        rows.append(row)
    result = {"device": device, "batch": BATCH, "torch": torch_device is not None,
              "first_call": compile_info, "kernels": rows, "tile_sweep": tile_sweep()}
    return result


# ---------------------------------------------------------------- simulated: what the memory system would see

SIMULATED_MODEL, SIMULATED_BATCH = "micro", 2


def simulated_rows(cases, gpu="H200"):
    """`memprofile.profile_cases` over benchmark cases (ours, then the other version where there is
    one), their FLOPs declared by the cases that count GFLOP/s (None for the memory-bound ones)."""
    from minasgd.kernels import memprofile

    runs = []
    for case in cases:
        flops = case.work if case.unit == "GFLOP/s" else None
        runs.append((f"{case.name} ({case.shape})", "ours", case.ours, flops))
        if case.alt is not None:
            runs.append((f"{case.name} ({case.shape})", case.alt_name, case.alt, flops))
    return memprofile.profile_cases(runs, gpu)


def simulated_result(model=SIMULATED_MODEL, batch=SIMULATED_BATCH, gpu="H200", only=None):
    """`--simulated`: {"model", "batch", "gpu", "kernels": simulated_rows(...)} on the CUDA simulator,
    for the cases whose name contains `only` (default: every case). `minasgd.dashboard.show_kernel_profile`
    draws it. Every figure is modelled, none measured."""
    from numba import config

    if not config.ENABLE_CUDASIM:
        return {"skipped": "the memory profile runs on the CUDA simulator: set NUMBA_ENABLE_CUDASIM=1 "
                           "before numba is imported (`minasgd bench kernels --simulated` does)"}
    cases = [c for c in build_cases(model, batch) if only is None or only in c.name]
    return {"model": model, "batch": batch, "gpu": gpu, "kernels": simulated_rows(cases, gpu)}

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


def build_cases(model=MODEL, batch=BATCH, torch_device=None, tile=None):
    """Every benchmark row at the shapes one training step of `model` uses, with device inputs
    and preallocated outputs ready: the kernel registry's cases (`minasgd.kernels.registry`, the
    same ones the workbench validates), grouped by op. `ours` is the version the cuda backend
    uses, `alt` the first other one (the naive conv and GEMM, the gather pool backward).

    `torch_device` ("cuda", or "cpu" to check the calls without a GPU) adds the PyTorch
    equivalents; None leaves them out. `tile` sets the tile size of the tiled kernels (default 16).
    """
    from minasgd import backends
    from minasgd.kernels import registry
    from minasgd.workbench import layer_shapes

    twins = TorchTwins(torch_device) if torch_device is not None else None
    kernels = registry.cases(layer_shapes(model, batch), backends.get("numpy"), (tile or DEFAULT_TILE,))
    rows = {}
    for case in (c for c in kernels if c.bench):
        rows.setdefault(case.name, []).append(case)
    cases = []
    for name, versions in rows.items():
        ours = next(c for c in versions if c.default)
        alt = next((c for c in versions if not c.default), None)
        cases.append(Case(name, ours.size, ours.work, ours.unit, ours.launch, alt and alt.launch,
                          alt.version if alt else "", twins and twins.of(ours)))
    return cases


DEFAULT_TILE = 16  # the tile the kernels use unless told (conv.TILE, gemm.TILE)


class TorchTwins:
    """PyTorch's equivalent of a registry case (cuDNN, cuBLAS, ATen), on random inputs of its shapes."""

    def __init__(self, device):
        import torch
        import torch.nn.functional as F

        torch.backends.cudnn.benchmark = True
        self.torch, self.F, self.device = torch, F, device

    def randn(self, *shape):
        return self.torch.randn(*shape, device=self.device)

    def of(self, case):
        """The twin of `case` (a callable), or None where PyTorch has none."""
        kind = case.family if case.family != "elementwise" else case.name.split()[0]
        make = getattr(self, f"_{kind}", None)
        return make(case) if make else None

    def _conv(self, case):
        torch, F = self.torch, self.F
        sh, s, p = case.shapes, case.extra["stride"], case.extra["pad"]
        x, w, dy, k = self.randn(*sh["x"]), self.randn(*sh["w"]), self.randn(*sh["y"]), sh["w"][0]
        b = self.randn(k)

        def backward(mask):
            return torch.ops.aten.convolution_backward(dy, x, w, [k], [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)

        if case.name.endswith("forward"):
            return lambda: F.conv2d(x, w, b, s, p)
        return lambda: backward([True, False, False] if "data" in case.name else [False, True, False])  # dw only, as ours

    def _pool(self, case):
        torch, F = self.torch, self.F
        size, stride = case.extra["size"], case.extra["stride"]
        y = self.randn(*case.shapes["x"])
        if case.name.endswith("forward"):
            return lambda: F.max_pool2d(y, size, stride, return_indices=True)
        _, idx = F.max_pool2d(y, size, stride, return_indices=True)
        dy = self.randn(*case.shapes["y"])
        return lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            dy, y, [size, size], [stride, stride], [0, 0], [1, 1], False, idx)

    def _gemm(self, case):
        a, b = self.randn(*case.shapes["a"]), self.randn(*case.shapes["b"])
        if "forward" in case.name:  # y = x w^T + bias: a is x (N, D), b is w (M, D)
            bias = self.randn(case.shapes["c"][1])
            return lambda: self.F.linear(a, b, bias)
        return (lambda: a.t() @ b) if "dw" in case.name else (lambda: a @ b)

    def _relu(self, case):
        torch, F = self.torch, self.F
        a, dy = self.randn(*case.shapes["x"]), self.randn(*case.shapes["x"])
        return (lambda: F.relu(a)) if case.name.endswith("forward") else (
            lambda: torch.ops.aten.threshold_backward(dy, a, 0.0))

    def _dropout(self, case):
        a = self.randn(*case.shapes["x"])
        return lambda: self.F.dropout(a, 0.5, training=True)

    def _softmax(self, case):
        torch, F = self.torch, self.F
        (n, m) = case.shapes["logits"]
        logits, labels = self.randn(n, m), torch.randint(0, m, (n,), device=self.device)

        def loss_and_grad():  # loss and its gradient, like ours
            logits.requires_grad_(True)
            loss = F.cross_entropy(logits, labels)
            return loss.detach(), torch.autograd.grad(loss, logits)[0]

        return loss_and_grad

    def _optim(self, case):
        n = case.shapes["w"][0]
        w, g, v = self.randn(n), self.randn(n), self.torch.zeros(n, device=self.device)

        def sgd():
            v.mul_(0.9).add_(g).add_(w, alpha=5e-4)
            w.add_(v, alpha=-0.01)

        return sgd


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

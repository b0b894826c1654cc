"""One registry of every kernel: each op family's versions, and its cases at a model's shapes.

Each op module (FAMILIES) declares, next to its kernels:

    VERSIONS_OF = {"conv2d_forward": (Version("conv2d_forward", "naive", "v1 naive", "launch_forward_naive", True),
                                      Version(..., "tiled", ..., default=True)), ...}
    signatures()              what its launchers pass (compiled offline for real GPUs: `resources`)
    cases(net, ref, tiles, make)   -> [Case]: every version of every op at the shapes in `net`,
                              inputs on the device, outputs preallocated and NaN-filled, with the
                              reference's answer (`ref` is the NumPy reference backend, passed in:
                              this floor imports nothing above it)

and everything that enumerates kernels iterates this module, never a list of its own:

    cases(net, ref, tiles)        every Case of every family (or of `families`)
    versions()                    every Version;  default_version(op) the one the backend uses
    signatures()                  every launch configuration (the compile check, `bench --static`)
    modules()                     the op modules themselves (race checker, `@cuda.jit` scans)

The users: `minasgd.workbench` (validate every case, then time it: `python -m minasgd.kernels.conv`),
`minasgd.bench_kernels` (the backend's version against another and PyTorch),
`minasgd.kernels.resources` (registers, shared memory, occupancy), tests/kernel_workload.py (the
race checker and the compile check launch every case at tiny shapes). A Case is plain data plus
one `launch` callable, so any other loop (a memory profile on the simulator, say) can iterate it too.

`net` is the dict `minasgd.workbench.layer_shapes(model, batch)` returns:
{"conv": [{"name", "x", "w", "stride", "pad"}], "pool": [{"name", "x", "size", "stride"}],
 "fc": [{"name", "x", "w"}], "largest", "classes", "num_params"}.
"""

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

FAMILIES = ("conv", "pool", "gemm", "softmax", "elementwise", "reduce", "optim")  # each a module here
COMMON = "common"  # kernels every family uses (fill): declared in signatures() too, no cases of its own


@dataclass(frozen=True)
class Version:
    """One way to compute an op: what `version=` takes, how it is labelled, which launcher runs it."""

    op: str  # the public function, e.g. "conv2d_backward_data"
    name: str  # what its `version=` takes: "naive", "gather", "tiled", ...
    label: str  # "v2 gather": the number says the order a student meets them in
    launcher: str  # the module's launcher that runs it, e.g. "launch_backward_data_gather"
    deterministic: bool  # the same bits every run (no atomics adding in arrival order)
    default: bool = False  # the version `minasgd.backends.cuda_backend` uses


@dataclass
class Case:
    """One version of one op at one shape, ready to launch.

    `launch()` runs the kernel into preallocated outputs (NaN-filled first, so an element never
    written fails the comparison) and returns them; `check()` (default: launch) returns what to
    compare with `expect`, the NumPy reference's answer (a tuple for several outputs)."""

    family: str  # the module: "conv"
    name: str  # the op at a layer: "conv1 forward"
    version: str  # the Version's name: "tiled"
    label: str  # the workbench's line: "conv1 forward v2 tiled 16x16"
    launch: Callable[[], object]
    shapes: dict  # the arrays' shapes by argument name, e.g. {"x": (N, C, H, W), "w": (K, C, R, S)}
    expect: object = None
    work: float = 0.0  # floating-point operations, or bytes moved for memory-bound ops
    unit: str = "GB/s"  # "GFLOP/s" or "GB/s"
    check: Optional[Callable[[], object]] = None
    exact: bool = False  # compared bit for bit (no tolerance)
    deterministic: bool = True
    default: bool = False  # the backend's version: the benchmark's "ours"
    tile: Optional[int] = None
    size: str = ""  # how the shapes read in a table: "128x32x15x15 * 64x32x5x5 pad 2"
    bench: bool = True  # a row of `minasgd bench kernels` (False: validated and compiled, not in its table)
    extra: dict = field(default_factory=dict)


class Make:
    """What a module's `cases()` builds its inputs with: seeded random host arrays, device copies,
    NaN-filled device outputs (-7 for integer ones)."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def randn(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def dev(self, a):
        from numba import cuda

        return cuda.to_device(np.ascontiguousarray(a))

    def nan(self, shape, dtype=np.float32):
        from numba import cuda

        return cuda.to_device(np.full(shape, -7 if np.dtype(dtype).kind == "i" else np.nan, dtype=dtype))


def module(family):
    return importlib.import_module(f"{__package__}.{family}")


def modules(families=FAMILIES):
    """The op modules (and `common`, whose fill kernel they all use)."""
    return [module(f) for f in (*families, COMMON)]


def versions(families=FAMILIES):
    """Every Version of every op, in the modules' order."""
    return [v for f in families for vs in module(f).VERSIONS_OF.values() for v in vs]


def pick(versions_of, op, name):
    """The Version `name` of public function `op` in a module's VERSIONS_OF (what its public
    function checks `version=` with: a short loop, no import); ValueError naming the choices."""
    for v in versions_of[op]:
        if v.name == name:
            return v
    raise ValueError(f"{op}: unknown version {name!r}; choose one of {tuple(v.name for v in versions_of[op])}")


def version_of(op, name):
    """The Version `name` of public function `op`, whichever family declares it."""
    family = next((f for f in FAMILIES if op in module(f).VERSIONS_OF), None)
    if family is None:
        raise ValueError(f"no kernel module declares {op!r}")
    return pick(module(family).VERSIONS_OF, op, name)


def default_version(op):
    family = next(f for f in FAMILIES if op in module(f).VERSIONS_OF)
    return next(v for v in module(family).VERSIONS_OF[op] if v.default)


def signatures(families=FAMILIES):
    """Every `common.Signature` of every kernel module, in a fixed order."""
    return [s for m in modules(families) for s in m.signatures()]


def cases(net, ref, tiles, families=FAMILIES, seed=0):
    """Every Case of `families` at the shapes of `net`, tiled kernels at each of `tiles`."""
    make = Make(seed)
    return [c for f in families for c in module(f).cases(net, ref, tuple(tiles), make)]


def dims(*shape):
    """(2, 3, 5) -> "2x3x5": how a shape reads in a label."""
    return "x".join(str(d) for d in shape)

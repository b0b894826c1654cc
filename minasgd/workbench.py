"""The llm.c loop for every kernel family: validate every version and tile size against the
NumPy reference, then time them. One family per run, so a student edits a kernel and reruns it:

    python -m minasgd.kernels.conv        (pool, gemm, softmax, elementwise, reduce, optim)

On a GPU the shapes are the layers of Model("alexnet-mini") at batch 128; every configuration
is validated (outputs pre-filled with NaN, the first mismatches reported with their indices),
then, once all match, timed (median of several samples). On the CUDA simulator
(NUMBA_ENABLE_CUDASIM=1) the shapes are Model("micro")'s at batch 2 and nothing is timed:
simulator timings mean nothing; instead each version is launched once more (tiled ones with
16 x 16 blocks) under `minasgd.kernels.memprofile`, which prints what the memory system would
see: sectors per warp request, coalescing, bank conflicts (modelled, not measured).

What is validated is each kernel module's own `cases()` (every version at the model's shapes,
`minasgd.kernels.registry`): this module only runs them. Why the loop is here and not in
kernels/: it needs the reference (minasgd.backends) and the model's shapes (minasgd.model),
floors above the kernels, which it hands down to `registry.cases`. Each kernel module ends with a
three-line `if __name__ == "__main__":` block that calls `main` here; that block runs only when
the file is executed, never on import, so importing kernels/ still pulls in nothing above it
(tests/test_layering.py allows exactly this one upward import, and only in that block).
"""

import math
import sys

import numpy as np

from .backends import numpy_backend
from .kernels import registry
from .timer import median_seconds

OPS = registry.FAMILIES  # one workbench per op family, each family's cases declared in its module


# ---------------------------------------------------------------- shapes, from the model

def layer_shapes(model_name="alexnet-mini", batch=128):
    """The shapes one training step of the model feeds each op, read off Model(model_name).

    {"conv": [{"name", "x": (N, C, H, W), "w": (K, C, R, S), "stride", "pad"}],
     "pool": [{"name", "x", "size", "stride"}], "fc": [{"name", "x": (N, D), "w": (M, D)}],
     "largest": elements of the largest activation, "classes", "num_params"}
    """
    from . import backends
    from .layers import Conv2d, Linear, MaxPool2d
    from .model import Model

    model = Model(model_name, backends.get("numpy"))
    out = {"conv": [], "pool": [], "fc": [], "largest": 0, "classes": model.num_classes,
           "num_params": model.num_params}
    for layer in model.layers:
        x = (batch, *layer.in_shape)
        if isinstance(layer, Conv2d):
            out["conv"].append({"name": layer.name, "x": x, "w": layer.param_shapes["w"],
                                "stride": layer.stride, "pad": layer.pad})
        elif isinstance(layer, MaxPool2d):
            out["pool"].append({"name": layer.name, "x": x, "size": layer.size, "stride": layer.stride})
        elif isinstance(layer, Linear):
            out["fc"].append({"name": layer.name, "x": x, "w": layer.param_shapes["w"]})
        out["largest"] = max(out["largest"], batch * math.prod(layer.out_shape))
    return out


# ---------------------------------------------------------------- validation

def first_mismatches(got, expect, rtol, atol, limit=5):
    """None when got matches expect elementwise, else a message naming the first few bad indices."""
    got, expect = np.asarray(got), np.asarray(expect)
    if got.shape != expect.shape:
        return f"shape {got.shape}, expected {expect.shape}"
    bad = ~np.isclose(got, expect, rtol=rtol, atol=atol)  # NaN (an element never written) is bad
    if not bad.any():
        return None
    where = np.argwhere(bad)[:limit]
    shown = ", ".join(f"{tuple(int(i) for i in ix)}: {got[tuple(ix)]:.6g} vs {expect[tuple(ix)]:.6g}" for ix in where)
    return f"{int(bad.sum())} of {bad.size} differ; first {shown}"


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def validate(cfg, sim):
    """None if the case's output (a `registry.Case`) matches the reference, else the mismatch message."""
    got = (cfg.check or cfg.launch)()
    gots = got if isinstance(got, tuple) else (got,)
    expects = cfg.expect if isinstance(cfg.expect, tuple) else (cfg.expect,)
    tol = 0.0 if cfg.exact else (1e-5 if sim else 1e-3)
    for g, e in zip(gots, expects):
        g, e = _host(g), np.asarray(e)
        scale = 1.0 if cfg.exact else max(1.0, float(np.abs(e).max()) if e.size else 1.0)
        message = first_mismatches(g / scale if not cfg.exact else g, e / scale if not cfg.exact else e, tol, tol)
        if message:
            return message
    return None


# ---------------------------------------------------------------- the loop

def run(op, validate_only=None, model=None, batch=None, tiles=None, out=print, profile=False):
    """Validate every configuration of `op`, then (on a GPU, unless validate_only) time them.
    On the simulator with `profile`, then print the modelled memory profile of every configuration
    at PROFILE_TILE (see `profile_table`).

    Returns {"op", "device", "mismatches": [(label, message)], "timings": [{"label", "ms", "rate", "unit"}]}.
    """
    from numba import config, cuda

    sim = bool(config.ENABLE_CUDASIM)
    if validate_only is None:
        validate_only = sim
    model = model or ("micro" if sim else "alexnet-mini")
    batch = batch or (2 if sim else 128)
    tiles = tiles or ((4,) if sim else (8, 16, 32))
    device = "CUDA simulator" if sim else str(cuda.get_current_device().name)
    out(f"{op} on {device}: the shapes of {model}, batch {batch}")
    configs = registry.cases(layer_shapes(model, batch), numpy_backend, tiles, families=(op,))
    result = {"op": op, "device": device, "mismatches": [], "timings": []}
    for cfg in configs:
        message = validate(cfg, sim)
        out(f"  {'ok      ' if message is None else 'MISMATCH'} {cfg.label}" + (f": {message}" if message else ""))
        if message:
            result["mismatches"].append((cfg.label, message))
    if result["mismatches"]:
        out(f"{len(result['mismatches'])} of {len(configs)} configurations do not match the reference.")
        return result
    out("All results match." + ("" if validate_only else " Starting benchmarks."))
    if validate_only:
        if sim:
            out("(the simulator: nothing timed, its timings mean nothing)")
            if profile:
                out(profile_table(registry.cases(layer_shapes(model, batch), numpy_backend, (PROFILE_TILE,),
                                                 families=(op,))))
        return result
    for cfg in configs:
        seconds = median_seconds(cfg.launch, repeats=7, calls=5, sync=cuda.synchronize)
        row = {"label": cfg.label, "ms": seconds * 1e3, "rate": cfg.work / seconds / 1e9, "unit": cfg.unit}
        result["timings"].append(row)
        out(f"  {cfg.label:<52} {row['ms']:9.3f} ms  {row['rate']:8.1f} {cfg.unit}")
    return result


PROFILE_TILE = 16  # the tile the backend uses: a 16 x 16 block is 8 whole warps (a 4 x 4 one is half a warp)


def profile_table(configs):
    """The modelled memory profile (kernels/memprofile.py) of one launch of each case, as text."""
    from .kernels import memprofile

    rows = memprofile.profile_cases([(cfg.label, "", cfg.launch, cfg.work if cfg.unit == "GFLOP/s" else None)
                                     for cfg in configs])
    return memprofile.format_table(rows)


def main(op, argv=None):
    """`python -m minasgd.kernels.<op> [--validate-only]`: exit status 0 when every version matches.
    On the simulator, without --validate-only, the memory profile of every version follows."""
    argv = sys.argv[1:] if argv is None else argv
    result = run(op, validate_only=True if "--validate-only" in argv else None, profile="--validate-only" not in argv)
    return 1 if result["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "conv", sys.argv[2:]))

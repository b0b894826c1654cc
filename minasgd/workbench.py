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

Why here and not in kernels/: the workbench needs the reference (minasgd.backends) and the
model's shapes (minasgd.model), floors above the kernels. Each kernel module ends with a
three-line `if __name__ == "__main__":` block that calls `main` here; that block runs only when
the file is executed, never on import, so importing kernels/ still pulls in nothing above it
(tests/test_layering.py allows exactly this one upward import, and only in that block).
"""

import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .timer import median_seconds

OPS = ("conv", "pool", "gemm", "softmax", "elementwise", "reduce", "optim")


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


@dataclass
class Config:
    """One kernel version at one size: `run()` launches it (writing preallocated outputs),
    `check()` returns what to compare with `expect` (default: run()'s result)."""

    op: str
    label: str
    run: Callable[[], object]
    expect: object
    work: float  # FLOPs, or bytes moved for memory-bound ops
    unit: str  # "GFLOP/s" or "GB/s"
    check: Callable[[], object] = None
    exact: bool = False


def _host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


def validate(cfg, sim):
    """None if cfg's output matches the reference, else the mismatch message."""
    got = (cfg.check or cfg.run)()
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


# ---------------------------------------------------------------- the configurations of each op

def _tools(seed=0):
    from numba import cuda

    rng = np.random.default_rng(seed)

    def randn(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def dev(a):
        return cuda.to_device(np.ascontiguousarray(a))

    def nan(shape, dtype=np.float32):
        return cuda.to_device(np.full(shape, -7 if np.dtype(dtype).kind == "i" else np.nan, dtype=dtype))

    return rng, randn, dev, nan


def conv_configs(shapes, tiles):
    from .backends import numpy_backend as ref
    from .kernels import conv

    _, randn, dev, nan = _tools()
    out = []
    for L in shapes["conv"]:
        x, w, b = randn(*L["x"]), randn(*L["w"]), randn(L["w"][0])
        s, p = L["stride"], L["pad"]
        y_ref = ref.conv2d_forward(x, w, b, s, p)
        dy = randn(*y_ref.shape)
        dx_ref, dw_ref, _ = ref.conv2d_backward(dy, x, w, s, p)
        flops = 2.0 * y_ref.size * math.prod(L["w"][1:])
        dx_, dw_, b_, dy_ = dev(x), dev(w), dev(b), dev(dy)
        name = L["name"]
        y = nan(y_ref.shape)
        out.append(Config("conv", f"{name} forward v1 naive", lambda x=dx_, w=dw_, b=b_, y=y, s=s, p=p:
                          conv.conv2d_forward(x, w, b, s, p, out=y, version="naive"), y_ref, flops, "GFLOP/s"))
        for t in tiles:
            y = nan(y_ref.shape)
            out.append(Config("conv", f"{name} forward v2 tiled {t}x{t}", lambda x=dx_, w=dw_, b=b_, y=y, s=s, p=p, t=t:
                              conv.conv2d_forward(x, w, b, s, p, out=y, version="tiled", tile=t), y_ref, flops, "GFLOP/s"))
        for version in conv.DATA_VERSIONS:
            g = nan(x.shape)
            out.append(Config("conv", f"{name} backward data {version}", lambda dy=dy_, w=dw_, g=g, s=s, p=p, v=version:
                              conv.conv2d_backward_data(dy, w, g.shape, s, p, out=g, version=v), dx_ref, flops, "GFLOP/s"))
        g = nan(w.shape)
        out.append(Config("conv", f"{name} backward filter v1 naive", lambda dy=dy_, x=dx_, g=g, s=s, p=p:
                          conv.conv2d_backward_filter(dy, x, g.shape, s, p, out=g, version="naive"), dw_ref, flops, "GFLOP/s"))
        for t in tiles:
            g = nan(w.shape)
            out.append(Config("conv", f"{name} backward filter v2 tiled {t}x{t}", lambda dy=dy_, x=dx_, g=g, s=s, p=p, t=t:
                              conv.conv2d_backward_filter(dy, x, g.shape, s, p, out=g, tile=t), dw_ref, flops, "GFLOP/s"))
    return out


def pool_configs(shapes, tiles):
    from .backends import numpy_backend as ref
    from .kernels import pool

    _, randn, dev, nan = _tools()
    out = []
    for L in shapes["pool"]:
        x, size, stride = randn(*L["x"]), L["size"], L["stride"]
        y_ref, arg_ref = ref.maxpool2d_forward(x, size, stride)
        dy = randn(*y_ref.shape)
        dx_ref = ref.maxpool2d_backward(dy, arg_ref, x.shape)
        x_, dy_, arg_ = dev(x), dev(dy), dev(arg_ref)
        y, arg = nan(y_ref.shape), nan(y_ref.shape, np.int32)
        moved = 4.0 * x.size + 8.0 * y_ref.size
        out.append(Config("pool", f"{L['name']} forward", lambda x=x_, y=y, a=arg, k=size, s=stride:
                          pool.maxpool2d_forward(x, k, s, out=y, out_argmax=a), (y_ref, arg_ref), moved, "GB/s", exact=True))
        g = nan(x.shape)
        out.append(Config("pool", f"{L['name']} backward v1 scatter (atomics)", lambda dy=dy_, a=arg_, g=g:
                          pool.maxpool2d_backward(dy, a, g.shape, out=g), dx_ref, moved + 4.0 * x.size, "GB/s"))
        g = nan(x.shape)
        out.append(Config("pool", f"{L['name']} backward v2 gather (deterministic)", lambda dy=dy_, a=arg_, g=g, k=size, s=stride:
                          pool.maxpool2d_backward_gather(dy, a, g.shape, k, s, out=g), dx_ref, moved + 4.0 * x.size, "GB/s"))
    return out


def gemm_configs(shapes, tiles):
    from .kernels import gemm

    _, randn, dev, nan = _tools()
    out = []
    for L in shapes["fc"]:
        (n, d), (m, _) = L["x"], L["w"]
        x, w, b, dy = randn(n, d), randn(m, d), randn(m), randn(n, m)
        flops = 2.0 * n * d * m
        products = (("forward y = x w^T + b", (x, w, False, True, b), x @ w.T + b),
                    ("backward dx = dy w", (dy, w, False, False, None), dy @ w),
                    ("backward dw = dy^T x", (dy, x, True, False, None), dy.T @ x))
        for what, (a, bm, ta, tb, bias), expect in products:
            a_, b_, bias_ = dev(a), dev(bm), None if bias is None else dev(bias)
            for version, tile in [("naive", None)] + [(v, t) for t in tiles for v in ("tiled", "tiled_padded")]:
                c = nan(expect.shape)
                kw = {} if tile is None else {"tile": tile}
                name = {"naive": "v1 naive", "tiled": "v2 tiled", "tiled_padded": "v3 tiled_padded"}[version]
                label = f"{L['name']} {what} {name}" + ("" if tile is None else f" {tile}x{tile}")
                out.append(Config("gemm", label, lambda a=a_, b=b_, ta=ta, tb=tb, bias=bias_, c=c, v=version, kw=kw:
                                  gemm.gemm(a, b, ta, tb, bias=bias, out=c, version=v, **kw), expect, flops, "GFLOP/s"))
    return out


def softmax_configs(shapes, tiles):
    from .backends import numpy_backend as ref
    from .kernels import softmax

    rng, randn, dev, nan = _tools()
    n, m = shapes["fc"][-1]["x"][0], shapes["classes"]
    logits, labels = randn(n, m) * 10, rng.integers(0, m, n).astype(np.int32)
    loss_ref, d_ref = ref.softmax_cross_entropy(logits, labels)
    lg, lb, d = dev(logits), dev(labels), nan((n, m))
    return [Config("softmax", "softmax + cross-entropy v1 (a thread per row)",
                   lambda: softmax.softmax_cross_entropy(lg, lb, out=d), (loss_ref, d_ref), 8.0 * n * m + 4.0 * n, "GB/s")]


def elementwise_configs(shapes, tiles):
    from .backends import numpy_backend as ref
    from .kernels import elementwise

    _, randn, dev, nan = _tools()
    size = shapes["largest"]
    x, dy = randn(size), randn(size)
    x_, dy_ = dev(x), dev(dy)
    y_ = dev(ref.relu_forward(x))
    outs = [nan(size) for _ in range(3)]
    return [
        Config("elementwise", "relu forward", lambda: elementwise.relu_forward(x_, out=outs[0]),
               ref.relu_forward(x), 8.0 * size, "GB/s", exact=True),
        Config("elementwise", "relu backward", lambda: elementwise.relu_backward(dy_, y_, out=outs[1]),
               ref.relu_backward(dy, ref.relu_forward(x)), 12.0 * size, "GB/s", exact=True),
        Config("elementwise", "dropout p=0.5 (hash mask)", lambda: elementwise.dropout(x_, 0.5, 1234, out=outs[2]),
               ref.dropout_forward(x, 0.5, 1234), 8.0 * size, "GB/s", exact=True),
    ]


def reduce_configs(shapes, tiles):
    from .kernels import reduce

    _, randn, dev, nan = _tools()
    out = []
    batch = shapes["fc"][0]["x"][0]
    cases = [(f"{L['name']} bias grad", (batch, L["w"][0], *_conv_out(L))) for L in shapes["conv"]]
    cases += [(f"{L['name']} bias grad", (batch, L["w"][0])) for L in shapes["fc"]]
    for label, shape in cases:
        x = randn(*shape)
        expect = x.sum(axis=tuple(i for i in range(x.ndim) if i != 1))
        x_, s = dev(x), nan(expect.shape)
        out.append(Config("reduce", f"{label} {shape}", lambda x=x_, s=s: reduce.sum_over_batch(x, out=s),
                          expect, 4.0 * x.size, "GB/s"))
    losses = randn(batch)
    l_, s = dev(losses), nan((1,))
    out.append(Config("reduce", f"mean loss ({batch},)", lambda: reduce.sum_over_batch(l_, scale=1.0 / batch, out=s),
                      np.array([losses.sum() / batch], np.float32), 4.0 * batch, "GB/s"))
    grads = randn(shapes["largest"])  # block_sum: a tree per block, an atomic finish (not bit-deterministic)
    g_, t = dev(grads), nan((1,))
    out.append(Config("reduce", f"block_sum ({grads.size},)", lambda: reduce.block_sum(g_, out=t),
                      np.array([grads.astype(np.float64).sum()], np.float32), 4.0 * grads.size, "GB/s"))
    return out


def _conv_out(L):
    from .kernels import shapes

    return shapes.conv2d_output_shape(L["x"], L["w"], L["stride"], L["pad"])[2:]


def optim_configs(shapes, tiles):
    from .backends import numpy_backend as ref
    from .kernels import optim

    _, randn, dev, nan = _tools()
    n = shapes["num_params"]
    w, g, v = randn(n), randn(n), randn(n)
    w_ref, v_ref = w.copy(), v.copy()
    ref.sgd_update(w_ref, g, v_ref, 0.01, 0.9, 5e-4)
    y_ref = w + np.float32(-0.5) * g
    w_, g_, v_, y_ = dev(w), dev(g), dev(v), dev(w)

    def sgd_check():  # in place: start from fresh copies
        w_.copy_to_device(w)
        v_.copy_to_device(v)
        optim.sgd_update(w_, g_, v_, 0.01, 0.9, 5e-4)
        return w_, v_

    def axpy_check():
        y_.copy_to_device(w)
        optim.axpy(y_, -0.5, g_)
        return y_

    return [
        Config("optim", f"sgd momentum + decay ({n:,} params)", lambda: optim.sgd_update(w_, g_, v_, 0.01, 0.9, 5e-4),
               (w_ref, v_ref), 20.0 * n, "GB/s", check=sgd_check),
        Config("optim", f"axpy ({n:,} params)", lambda: optim.axpy(y_, -0.5, g_), y_ref, 12.0 * n, "GB/s", check=axpy_check),
    ]


BUILDERS = {"conv": conv_configs, "pool": pool_configs, "gemm": gemm_configs, "softmax": softmax_configs,
            "elementwise": elementwise_configs, "reduce": reduce_configs, "optim": optim_configs}


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
    configs = BUILDERS[op](layer_shapes(model, batch), tiles)
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
                out(profile_table(BUILDERS[op](layer_shapes(model, batch), (PROFILE_TILE,))))
        return result
    for cfg in configs:
        seconds = median_seconds(cfg.run, repeats=7, calls=5, sync=cuda.synchronize)
        row = {"label": cfg.label, "ms": seconds * 1e3, "rate": cfg.work / seconds / 1e9, "unit": cfg.unit}
        result["timings"].append(row)
        out(f"  {cfg.label:<52} {row['ms']:9.3f} ms  {row['rate']:8.1f} {cfg.unit}")
    return result


PROFILE_TILE = 16  # the tile the backend uses: a 16 x 16 block is 8 whole warps (a 4 x 4 one is half a warp)


def profile_table(configs):
    """The modelled memory profile (kernels/memprofile.py) of one launch of each configuration, as text."""
    from .kernels import memprofile

    rows = memprofile.profile_cases([(cfg.label, "", cfg.run, cfg.work if cfg.unit == "GFLOP/s" else None)
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

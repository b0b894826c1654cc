"""Launch every kernel the cuda backend has, at tiny sizes: a training step through the backend,
then every case of the kernel registry (`minasgd.kernels.registry`: each module's own cases, every
version) at TINY shapes. The race checker runs it (tests/test_racecheck.py), and the compile check
records what it passes (tests/test_compile_kernels.py). Nothing here lists ops: a new kernel
module in registry.FAMILIES is launched here by its own `cases()`.
"""

import inspect
import re

import numpy as np

from minasgd.backends import cuda_backend as be
from minasgd.backends import numpy_backend as ref
from minasgd.kernels import conv, gemm, registry

KERNEL_MODULES = tuple(registry.modules())  # every op family, and common (fill)

# A model's worth of layers, tiny: what every registry case is launched at (a stride-2 conv too).
TINY = {"conv": [{"name": "conv1", "x": (2, 2, 5, 5), "w": (3, 2, 3, 3), "stride": 1, "pad": 1},
                 {"name": "conv2", "x": (2, 3, 5, 5), "w": (2, 3, 3, 3), "stride": 2, "pad": 1}],
        "pool": [{"name": "pool1", "x": (2, 3, 5, 5), "size": 3, "stride": 2}],
        "fc": [{"name": "fc1", "x": (2, 12), "w": (4, 12)}],
        "largest": 150, "classes": 4, "num_params": 48}


def kernel_names(modules=KERNEL_MODULES):
    """Every `@cuda.jit` kernel (not device function) defined in the modules' source."""
    names = set()
    for module in modules:
        for args, name in re.findall(r"@cuda\.jit\(([^)]*)\)\s*\n\s*def (\w+)", inspect.getsource(module)):
            if "device=True" not in args:
                names.add(name)
    return names


def dev(rng, *shape):
    return be.asarray(rng.standard_normal(shape).astype(np.float32))


def every_kernel(rng, tile):
    """One tiny training step through the backend, then every registry case (tiled ones with `tile`)."""
    x = dev(rng, 2, 2, 5, 5)
    w, b = dev(rng, 3, 2, 3, 3), dev(rng, 3)
    w2, b2 = dev(rng, 4, 12), dev(rng, 4)
    labels = np.array([1, 3], dtype=np.int32)
    y = be.conv2d_forward(x, w, b, 1, 1)  # (2, 3, 5, 5)
    r = be.relu_forward(y)
    p, am = be.maxpool2d_forward(r, 3, 2)  # (2, 3, 2, 2)
    h = be.dropout_forward(p.reshape(2, 12), 0.5, 7)
    logits = be.linear_forward(h, w2, b2)
    loss, dlogits = be.softmax_cross_entropy(logits, labels)
    dh, dw2, db2 = be.linear_backward(dlogits, h, w2)
    dp = be.dropout_backward(dh, 0.5, 7).reshape(2, 3, 2, 2)
    dr = be.maxpool2d_backward(dp, am, r.shape)
    dy = be.relu_backward(dr, r)
    be.conv2d_backward(dy, x, w, 1, 1)
    be.sgd_update(w2.reshape(48), dw2.reshape(48), be.zeros(48), 0.1, 0.9, 1e-4)
    be.axpy(b2, 0.5, db2)
    # every version of every op, as each kernel module declares them, with tile x tile blocks
    for case in registry.cases(TINY, ref, (tile,)):
        case.launch()
    # launch options no case takes: the split-K filter gradient in 3 splits, every transposition
    conv.conv2d_backward_filter(dy, x, w.shape, 1, 1, tile=tile, splits=3)
    for version in gemm.VERSIONS:
        for ta, tb in [(False, False), (True, False), (False, True), (True, True)]:
            a = dev(rng, 7, 5) if ta else dev(rng, 5, 7)
            bb = dev(rng, 6, 7) if tb else dev(rng, 7, 6)
            gemm.gemm(a, bb, ta, tb, bias=dev(rng, 6), version=version, tile=tile)

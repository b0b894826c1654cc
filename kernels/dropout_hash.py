"""The counter-based hash behind dropout masks.

Dropout needs one random bit per element. Instead of drawing and storing a
mask, we *compute* it: element `i` of a tensor is kept when

    hash32(seed, i) >= threshold(p)

`hash32` is a small integer mixer (the "lowbias32" finaliser by Chris
Wellons) applied to the flat element index mixed with the seed. All arithmetic
is uint32 and wraps mod 2**32, so this NumPy version, the Numba CUDA kernel
(`elementwise.py`, next to this file) and the Numba CUDA simulator produce the
bit-identical mask. Backward regenerates the mask from (seed, i): no storage.
"""

import numpy as np

from .shapes import check_dropout_p

GOLDEN = np.uint32(0x9E3779B9)
MUL1 = np.uint32(0x7FEB352D)
MUL2 = np.uint32(0x846CA68B)


def hash32(seed, index):
    """uint32 hash of (seed, flat index). `index` may be an array of uint32."""
    with np.errstate(over="ignore"):
        x = np.asarray(index, dtype=np.uint32) ^ (np.uint32(seed & 0xFFFFFFFF) * GOLDEN)
        x = x ^ (x >> np.uint32(16))
        x = x * MUL1
        x = x ^ (x >> np.uint32(15))
        x = x * MUL2
        x = x ^ (x >> np.uint32(16))
    return x


def keep_threshold(p):
    """Elements whose hash is >= this uint32 are kept (probability 1 - p)."""
    check_dropout_p(p)
    return np.uint32(min(int(round(p * 2.0**32)), 2**32 - 1))


def keep_mask(seed, size, p):
    """Boolean keep-mask for `size` elements (flat order)."""
    return hash32(seed, np.arange(size, dtype=np.uint32)) >= keep_threshold(p)

"""Moved to `minasgd.kernels.dropout_hash` (kernels/dropout_hash.py), the bottom floor, so that
`kernels/` needs nothing above it. This alias keeps `from minasgd import dropout_hash` working
for the tutorials; new code imports `minasgd.kernels.dropout_hash`.
"""

from .kernels.dropout_hash import GOLDEN, MUL1, MUL2, hash32, keep_mask, keep_threshold  # noqa: F401

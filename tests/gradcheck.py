"""Finite-difference gradient checks for the NumPy reference ops.

`numeric_grad(f, x)` perturbs each element of x by +-eps (in float64) and returns
d f / d x for a scalar f. Tests compare it with the analytic backward of an op.
"""

import numpy as np


def numeric_grad(f, x, eps=1e-3):
    """Central differences of the scalar function f at x (x is modified in place, then restored)."""
    g = np.zeros(x.shape, dtype=np.float64)
    flat_x = x.reshape(-1)
    flat_g = g.reshape(-1)
    for i in range(flat_x.size):
        old = flat_x[i]
        flat_x[i] = old + eps
        up = f()
        flat_x[i] = old - eps
        down = f()
        flat_x[i] = old
        flat_g[i] = (up - down) / (2 * eps)
    return g


def first_mismatches(actual, expected, rtol, atol, count=5):
    """A readable description of the first few elements where actual and expected differ."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    idx = np.argwhere(bad)[:count]
    rows = [f"  at {tuple(int(v) for v in i)}: got {actual[tuple(i)]!r}, expected {expected[tuple(i)]!r}" for i in idx]
    return f"{int(bad.sum())} of {bad.size} elements differ:\n" + "\n".join(rows)


def assert_close(actual, expected, rtol=1e-4, atol=1e-5):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        raise AssertionError(first_mismatches(actual, expected, rtol, atol))

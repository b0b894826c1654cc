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
    """A readable description of the first few elements where actual and expected differ.

    The first line names the first mismatch (index, got, expected): graders show that line.
    rtol = atol = 0 compares exactly (NaN never equals anything).
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    if rtol == 0 and atol == 0:
        bad = ~(actual == expected)
    else:
        bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    idx = [tuple(int(v) for v in i) for i in np.argwhere(bad)[:count]]
    rows = [f"at {i}: got {actual[i].item()!r}, expected {expected[i].item()!r}" for i in idx]
    head = f"{int(bad.sum())} of {bad.size} elements differ; first {rows[0]}" if rows else "arrays differ"
    return head + "".join(f"\n  {r}" for r in rows[1:])


def assert_equal(actual, expected, what="result"):
    """Exact equality of shape, dtype kind and every element, with the first mismatch in the message."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    if not np.array_equal(actual, expected):
        raise AssertionError(f"{what}: " + first_mismatches(actual, expected, 0, 0))


def assert_close(actual, expected, rtol=1e-4, atol=1e-5):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"shape {actual.shape} != expected {expected.shape}"
    if not np.allclose(actual, expected, rtol=rtol, atol=atol):
        raise AssertionError(first_mismatches(actual, expected, rtol, atol))

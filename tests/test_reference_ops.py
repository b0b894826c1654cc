"""The NumPy reference ops against finite differences (gradcheck), plus a few exact properties.

Inside a check the op runs in float64 (the reference is dtype-generic), so central differences
are accurate; the float32 behaviour is covered by the cross-backend tests.
"""

import numpy as np
import pytest

from minasgd.kernels import dropout_hash
from minasgd.backends import numpy_backend as ref

from gradcheck import assert_close, numeric_grad


def _loss_weights(shape, seed=7):
    """A fixed random projection so that the scalar loss sum(y * c) exercises every output."""
    return np.random.default_rng(seed).standard_normal(shape)


CONV_CASES = [
    # (N, C, H, W, K, R, S, stride, pad)
    (1, 1, 5, 5, 1, 3, 3, 1, 0),
    (2, 3, 7, 6, 2, 3, 3, 2, 1),
    (1, 2, 6, 7, 3, 5, 5, 1, 2),
    (2, 2, 5, 5, 2, 2, 3, 2, 0),
    (1, 3, 9, 9, 2, 5, 5, 2, 2),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradcheck(case):
    n, c, h, w, k, r, s, stride, pad = case
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((k, c, r, s))
    b = rng.standard_normal(k)

    cw = _loss_weights(ref.conv2d_forward(x, wt, b, stride, pad).shape)
    f = lambda: float((ref.conv2d_forward(x, wt, b, stride, pad) * cw).sum())
    dx, dw, db = ref.conv2d_backward(cw, x, wt, stride, pad)
    assert_close(dx, numeric_grad(f, x), rtol=1e-6, atol=1e-6)
    assert_close(dw, numeric_grad(f, wt), rtol=1e-6, atol=1e-6)
    assert_close(db, numeric_grad(f, b), rtol=1e-6, atol=1e-6)
    no_dx = ref.conv2d_backward(cw, x, wt, stride, pad, need_dx=False)
    assert no_dx[0] is None and np.array_equal(no_dx[1], dw) and np.array_equal(no_dx[2], db)


def test_conv2d_forward_matches_direct_loops():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 7, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    stride, pad = 2, 1
    y = ref.conv2d_forward(x, w, b, stride, pad)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    expect = np.zeros_like(y)
    for n in range(2):
        for k in range(4):
            for p in range(y.shape[2]):
                for q in range(y.shape[3]):
                    patch = xp[n, :, p * stride : p * stride + 3, q * stride : q * stride + 3]
                    expect[n, k, p, q] = (patch * w[k]).sum() + b[k]
    assert_close(y, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,size,stride", [((1, 1, 5, 5), 3, 2), ((2, 3, 7, 6), 3, 2), ((2, 2, 6, 6), 2, 2), ((1, 2, 5, 7), 3, 1)])
def test_maxpool_gradcheck(shape, size, stride):
    rng = np.random.default_rng(2)
    # distinct values so the max is unique and the function is differentiable
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64) * 0.1
    y, arg = ref.maxpool2d_forward(x, size, stride)
    cy = _loss_weights(y.shape)
    f = lambda: float((ref.maxpool2d_forward(x, size, stride)[0].astype(np.float64) * cy).sum())
    dx = ref.maxpool2d_backward(cy, arg, x.shape)
    assert_close(dx, numeric_grad(f, x, eps=1e-3), rtol=1e-6, atol=1e-6)


def test_maxpool_argmax_is_index_in_plane():
    x = np.arange(2 * 3 * 5 * 5, dtype=np.float32).reshape(2, 3, 5, 5)
    y, arg = ref.maxpool2d_forward(x, 3, 2)
    assert arg.dtype == np.int32 and y.shape == (2, 3, 2, 2)
    planes = x.reshape(2, 3, 25)
    np.testing.assert_array_equal(np.take_along_axis(planes, arg.reshape(2, 3, 4), axis=2).reshape(y.shape), y)


def test_maxpool_overlapping_windows_accumulate():
    # the centre element is the max of all four overlapping 3x3/2 windows of a 5x5 input
    x = np.zeros((1, 1, 5, 5), dtype=np.float32)
    x[0, 0, 2, 2] = 1.0
    y, arg = ref.maxpool2d_forward(x, 3, 2)
    dx = ref.maxpool2d_backward(np.ones_like(y), arg, x.shape)
    assert dx[0, 0, 2, 2] == 4.0 and dx.sum() == 4.0


def test_linear_gradcheck():
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    cy = _loss_weights((3, 4))
    f = lambda: float((ref.linear_forward(x, w, b).astype(np.float64) * cy).sum())
    dx, dw, db = ref.linear_backward(cy, x, w)
    for analytic, arg in ((dx, x), (dw, w), (db, b)):
        assert_close(analytic, numeric_grad(f, arg), rtol=1e-6, atol=1e-6)


def test_relu_gradcheck():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 4, 5))
    x[np.abs(x) < 0.05] = 0.5  # keep away from the kink
    cy = _loss_weights(x.shape)
    f = lambda: float((ref.relu_forward(x) * cy).sum())
    y = ref.relu_forward(x)
    assert_close(ref.relu_backward(cy, y), numeric_grad(f, x), rtol=1e-6, atol=1e-6)


def test_dropout_gradcheck_and_statistics():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 37))
    cy = _loss_weights(x.shape)
    f = lambda: float((ref.dropout_forward(x, 0.5, seed=11) * cy).sum())
    assert_close(ref.dropout_backward(cy, 0.5, seed=11), numeric_grad(f, x), rtol=1e-6, atol=1e-6)
    big = ref.dropout_forward(np.ones(200_000, np.float32), 0.3, seed=1)
    assert abs((big > 0).mean() - 0.7) < 0.01
    assert abs(big.mean() - 1.0) < 0.02  # inverted dropout keeps the expectation


def test_dropout_mask_depends_only_on_seed_and_index():
    a = ref.dropout_forward(np.ones((3, 50), np.float32), 0.5, seed=42)
    b = ref.dropout_forward(np.ones(150, np.float32), 0.5, seed=42).reshape(3, 50)
    c = ref.dropout_forward(np.ones((3, 50), np.float32), 0.5, seed=43)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(ref.dropout_forward(np.ones(4, np.float32), 0.0, seed=1), np.ones(4))


PINNED_HASHES = [33350994, 2767685996, 127880910, 2672842292]


def test_hash_known_values():
    # pinned so that a change to the mask (which would break bit-identity with the kernel) is noticed
    h = dropout_hash.hash32(1, np.arange(4, dtype=np.uint32))
    assert h.dtype == np.uint32
    assert h.tolist() == PINNED_HASHES


def test_softmax_cross_entropy_gradcheck_and_stability():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((5, 7))
    labels = np.array([0, 6, 3, 3, 1])
    f = lambda: float(ref.softmax_cross_entropy(logits, labels)[0][0])
    loss, d = ref.softmax_cross_entropy(logits, labels)
    assert_close(d, numeric_grad(f, logits, eps=1e-5), rtol=1e-6, atol=1e-7)
    huge = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    loss, d = ref.softmax_cross_entropy(huge, np.array([0]))
    assert np.isfinite(loss).all() and np.isfinite(d).all() and loss[0] < 1e-6
    assert loss.dtype == np.float32 and d.dtype == np.float32
    uniform, _ = ref.softmax_cross_entropy(np.zeros((2, 10), np.float32), np.array([1, 2]))
    assert abs(uniform[0] - np.log(10)) < 1e-5


def test_sgd_update_in_place():
    w = np.array([1.0, -2.0], np.float32)
    g = np.array([0.5, 0.5], np.float32)
    v = np.array([1.0, 0.0], np.float32)
    ref.sgd_update(w, g, v, lr=0.1, momentum=0.9, weight_decay=0.01)
    assert_close(v, [0.9 + 0.5 + 0.01, 0.5 - 0.02])
    assert_close(w, [1.0 - 0.1 * 1.41, -2.0 - 0.1 * 0.48])


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: ref.conv2d_forward(np.zeros((1, 3, 5, 5), np.float32), np.zeros((2, 4, 3, 3), np.float32), np.zeros(2, np.float32)), "channels"),
        (lambda: ref.conv2d_forward(np.zeros((3, 5, 5), np.float32), np.zeros((2, 3, 3, 3), np.float32), np.zeros(2, np.float32)), "4-D"),
        (lambda: ref.conv2d_forward(np.zeros((1, 3, 2, 2), np.float32), np.zeros((2, 3, 5, 5), np.float32), np.zeros(2, np.float32)), "does not fit"),
        (lambda: ref.maxpool2d_forward(np.zeros((1, 1, 2, 2), np.float32), 3, 2), "does not fit"),
        (lambda: ref.linear_forward(np.zeros((2, 3), np.float32), np.zeros((4, 5), np.float32), np.zeros(4, np.float32)), "features"),
        (lambda: ref.softmax_cross_entropy(np.zeros((2, 3), np.float32), np.array([0, 3])), "labels"),
        (lambda: ref.dropout_forward(np.zeros(3, np.float32), 1.0, 0), "dropout"),
    ],
)
def test_bad_shapes_give_one_line_errors(call, message):
    with pytest.raises(ValueError, match=message) as e:
        call()
    assert "\n" not in str(e.value)

"""The Numba CUDA kernels against the NumPy reference.

Three kinds of test:
  * kernel tests call `minasgd.kernels.*` directly, every version (naive and tiled), on tiny
    shapes that are NOT multiples of the tile or block (the CUDA simulator runs each thread in
    Python, ~0.2 ms a thread). Outputs are pre-filled with NaN, so an element a kernel forgets
    to write fails the comparison.
  * contract tests use the `be` fixture (numpy and cuda in turn): what any backend must do.
  * `gpu` tests repeat the comparisons at alexnet-mini sizes, batch 128 (`pytest -m gpu`).

Tolerances (float32; the reference sums in a different order through BLAS):
  exact          relu, dropout (bit-identical mask), max-pool forward and argmax
  rtol 1e-5      gemm, conv, reductions, softmax at tiny sizes (tens of terms per sum)
  rtol 1e-3      the same at real sizes (hundreds to 100k terms per sum)
"""

import math

import numpy as np
import pytest
from numba import cuda

from minasgd.backends import numpy_backend as ref
from minasgd.kernels import conv, dropout_hash, elementwise, gemm, optim, pool, reduce, softmax

from gradcheck import assert_close, assert_equal
from races import SIM, racecheck

# The simulator computes the dropout hash with NumPy uint32 scalars, which warn when they wrap (on purpose).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

TINY = dict(rtol=1e-5, atol=1e-5)
REAL = dict(rtol=1e-3, atol=1e-3)


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def nan_out(shape, dtype=np.float32):
    """A device buffer full of NaN (or -7 for integers): any element left unwritten shows."""
    fill = -7 if np.dtype(dtype).kind == "i" else np.nan
    return cuda.to_device(np.full(shape, fill, dtype=dtype))


def host(d):
    return d.copy_to_host()


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- gemm

TRANSPOSES = [(False, False), (False, True), (True, False), (True, True)]
GEMM_CASES = ([("naive", None, *t) for t in TRANSPOSES] + [("tiled", 16, *t) for t in TRANSPOSES] + [("tiled", 4, False, True)]
              + [("tiled_padded", 4, *t) for t in TRANSPOSES])


@pytest.mark.parametrize("version,tile,trans_a,trans_b", GEMM_CASES)
@pytest.mark.task_5_1
def test_gemm_matches_numpy(rng, version, tile, trans_a, trans_b):
    m, k, n = 17, 19, 13  # no dimension a multiple of the tile
    a = randn(rng, k, m) if trans_a else randn(rng, m, k)
    b = randn(rng, n, k) if trans_b else randn(rng, k, n)
    bias = randn(rng, n)
    expect = (a.T if trans_a else a) @ (b.T if trans_b else b) + bias
    kw = {} if tile is None else {"tile": tile}
    c = gemm.gemm(dev(a), dev(b), trans_a, trans_b, bias=dev(bias), out=nan_out((m, n)), version=version, **kw)
    assert_close(host(c), expect, **TINY)


@pytest.mark.parametrize("version", gemm.VERSIONS)
@pytest.mark.task_5_1
def test_gemm_without_bias_batch_one(rng, version):
    x, w = randn(rng, 1, 5), randn(rng, 3, 5)  # a batch of one: y = x w^T
    c = gemm.gemm(dev(x), dev(w), trans_b=True, out=nan_out((1, 3)), version=version)
    assert_close(host(c), x @ w.T, **TINY)


@pytest.mark.parametrize("version", ["tiled", "tiled_padded"])
@pytest.mark.task_5_1
def test_gemm_tiled_versions_are_race_free(rng, version):
    """Under the race checker: both barriers per slab are needed (a missing one is a race even
    when the simulator's thread order happens to give the right numbers)."""
    a, b = randn(rng, 9, 6), randn(rng, 7, 9)  # op(A) = A^T (6 x 9), op(B) = B^T (9 x 7): both staged transposed
    with racecheck():
        c = gemm.gemm(dev(a), dev(b), trans_a=True, trans_b=True, out=nan_out((6, 7)), version=version, tile=4)
    assert_close(host(c), a.T @ b.T, **TINY)


def test_gemm_rejects_mismatched_shapes(rng):
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm.gemm(dev(randn(rng, 2, 3)), dev(randn(rng, 4, 5)))
    with pytest.raises(ValueError, match="unknown version"):
        gemm.gemm(dev(randn(rng, 2, 3)), dev(randn(rng, 3, 5)), version="fast")


# ---------------------------------------------------------------- convolution

CONV_CASES = [
    # (N, C, H, W, K, R, S, stride, pad): odd sizes, batch 1, stride 1 and 2, pad 0, 1, 2
    (1, 2, 5, 5, 3, 3, 3, 1, 0),
    (2, 3, 7, 6, 4, 3, 3, 2, 1),
    (1, 2, 6, 7, 3, 5, 5, 1, 2),
    (1, 1, 9, 8, 2, 5, 5, 2, 2),
]


def _conv_case(rng, case):
    n, c, h, w, k, r, s, stride, pad = case
    return randn(rng, n, c, h, w), randn(rng, k, c, r, s), randn(rng, k), stride, pad


@pytest.mark.parametrize("version", conv.VERSIONS)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.task_2_1
def test_conv2d_forward(rng, case, version):
    x, w, b, stride, pad = _conv_case(rng, case)
    expect = ref.conv2d_forward(x, w, b, stride, pad)
    y = conv.conv2d_forward(dev(x), dev(w), dev(b), stride, pad, out=nan_out(expect.shape), version=version)
    assert_close(host(y), expect, **TINY)


def test_conv2d_forward_tiled_spans_several_tiles_in_every_direction(rng):
    # tile 4: K = 6 output channels (2 tiles), C*R*S = 18 (5 slabs), N*P*Q = 2*3*4 (6 tiles)
    x, w, b = randn(rng, 2, 2, 5, 7), randn(rng, 6, 2, 3, 3), randn(rng, 6)
    expect = ref.conv2d_forward(x, w, b, 2, 1)
    y = conv.conv2d_forward(dev(x), dev(w), dev(b), 2, 1, out=nan_out(expect.shape), version="tiled", tile=4)
    assert_close(host(y), expect, **TINY)


@pytest.mark.parametrize("data_version,filter_version", list(zip(conv.DATA_VERSIONS, conv.FILTER_VERSIONS)))
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_backward_data_and_filter(rng, case, data_version, filter_version):
    # v1 naive (both) and the optimized pair (gather, tiled split-K at the default 16 x 16 tile)
    x, w, _, stride, pad = _conv_case(rng, case)
    dy = randn(rng, *ref.conv2d_forward(x, w, np.zeros(w.shape[0], np.float32), stride, pad).shape)
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, x, w, stride, pad)
    dx = conv.conv2d_backward_data(dev(dy), dev(w), x.shape, stride, pad, out=nan_out(x.shape), version=data_version)
    dw = conv.conv2d_backward_filter(dev(dy), dev(x), w.shape, stride, pad, out=nan_out(w.shape), version=filter_version)
    db = reduce.sum_over_batch(dev(dy), out=nan_out(db_ref.shape))
    assert_close(host(dx), dx_ref, **TINY)
    assert_close(host(dw), dw_ref, **TINY)
    assert_close(host(db), db_ref, **TINY)


def test_conv2d_backward_filter_split_k_and_small_tile(rng):
    # several j-chunks per block (split-K, atomically added) and tiles in both dW directions
    x, w = randn(rng, 2, 2, 6, 5), randn(rng, 5, 2, 3, 3)
    dy = randn(rng, 2, 5, 6, 5)  # stride 1, pad 1: N*P*Q = 60 positions, 4 chunks of 16
    _, dw_ref, _ = ref.conv2d_backward(dy, x, w, 1, 1)
    dw = conv.conv2d_backward_filter(dev(dy), dev(x), w.shape, 1, 1, out=nan_out(w.shape), tile=4, splits=4)
    assert_close(host(dw), dw_ref, **TINY)


def test_conv2d_backward_unknown_versions_are_refused(rng):
    dy, w, x = dev(randn(rng, 1, 1, 3, 3)), dev(randn(rng, 1, 1, 3, 3)), dev(randn(rng, 1, 1, 5, 5))
    with pytest.raises(ValueError, match="unknown version"):
        conv.conv2d_backward_data(dy, w, (1, 1, 5, 5), version="fast")
    with pytest.raises(ValueError, match="unknown version"):
        conv.conv2d_backward_filter(dy, x, (1, 1, 3, 3), version="fast")


def test_conv2d_backward_returns_fresh_arrays(rng):
    x, w, _, stride, pad = _conv_case(rng, CONV_CASES[1])
    dy = randn(rng, 2, 4, 4, 3)
    outs = conv.conv2d_backward(dev(dy), dev(x), dev(w), stride, pad)
    for got, expect in zip(outs, ref.conv2d_backward(dy, x, w, stride, pad)):
        assert_close(host(got), expect, **TINY)


# ---------------------------------------------------------------- pooling

POOL_CASES = [((1, 1, 5, 5), 3, 2), ((2, 3, 7, 6), 3, 2), ((1, 2, 6, 6), 2, 2), ((1, 2, 5, 7), 3, 1)]


@pytest.mark.parametrize("shape,size,stride", POOL_CASES)
@pytest.mark.task_3_1
def test_maxpool2d_forward(rng, shape, size, stride):
    x = randn(rng, *shape)
    y_ref, arg_ref = ref.maxpool2d_forward(x, size, stride)
    y, arg = pool.maxpool2d_forward(dev(x), size, stride, out=nan_out(y_ref.shape), out_argmax=nan_out(y_ref.shape, np.int32))
    assert_equal(host(y), y_ref, "max-pool output")
    assert_equal(host(arg), arg_ref, "argmax")
    assert host(arg).dtype == np.int32


# The backward tests take the argmax from the NumPy reference, not from the forward kernel, so
# task 3.2 is graded on its own (whatever the state of task 3.1).

@pytest.mark.parametrize("shape,size,stride", POOL_CASES)
@pytest.mark.task_3_2
def test_maxpool2d_backward(rng, shape, size, stride):
    x = randn(rng, *shape)
    _, arg_ref = ref.maxpool2d_forward(x, size, stride)
    dy = randn(rng, *arg_ref.shape)
    dx_ref = ref.maxpool2d_backward(dy, arg_ref, shape)
    with racecheck():
        dx = pool.maxpool2d_backward(dev(dy), dev(arg_ref), shape, out=nan_out(shape))
    assert_close(host(dx), dx_ref, **TINY)


@pytest.mark.parametrize("shape,size,stride", POOL_CASES)
def test_maxpool2d_backward_gather(rng, shape, size, stride):
    x = randn(rng, *shape)
    _, arg_ref = ref.maxpool2d_forward(x, size, stride)
    dy = randn(rng, *arg_ref.shape)
    dx = pool.maxpool2d_backward(dev(dy), dev(arg_ref), shape, out=nan_out(shape), version="gather", size=size, stride=stride)
    assert_close(host(dx), ref.maxpool2d_backward(dy, arg_ref, shape), **TINY)


@pytest.mark.task_3_1
def test_maxpool2d_ties_pick_the_first_maximum():
    # integer values with many ties, and an all-equal plane: the argmax must match numpy's first max
    x = (np.arange(2 * 7 * 7) % 3).astype(np.float32).reshape(1, 2, 7, 7)
    x[0, 1] = 5.0
    y_ref, arg_ref = ref.maxpool2d_forward(x, 3, 2)
    y, arg = pool.maxpool2d_forward(dev(x), 3, 2)
    assert_equal(host(y), y_ref, "max-pool output")
    assert_equal(host(arg), arg_ref, "argmax (ties must keep the first maximum)")


def test_maxpool2d_backward_gather_is_reachable_through_the_backend(rng, monkeypatch):
    """The contract passes the window and stride, so the deterministic gather can be chosen."""
    from minasgd.backends import cuda_backend

    x = randn(rng, 1, 2, 7, 6)
    y_ref, arg_ref = ref.maxpool2d_forward(x, 3, 2)
    dy = randn(rng, *y_ref.shape)
    calls, real = [], pool.launch_backward_gather

    def spy(dy, argmax, dx, size, stride):
        calls.append((size, stride))
        return real(dy, argmax, dx, size, stride)

    monkeypatch.setattr(pool, "launch_backward_gather", spy)
    monkeypatch.setattr(cuda_backend, "POOL_BACKWARD_VERSION", "gather")
    dx = cuda_backend.maxpool2d_backward(dev(dy), dev(arg_ref), x.shape, 3, 2)
    assert_close(host(dx), ref.maxpool2d_backward(dy, arg_ref, x.shape), **TINY)
    assert calls == [(3, 2)]


@pytest.mark.task_3_2
def test_maxpool2d_overlapping_windows_accumulate():
    # all four overlapping 3x3/2 windows of a 5x5 plane have their max at (2, 2): four threads
    # add to one pixel, which a plain += instead of cuda.atomic.add gets wrong on a GPU
    arg = dev(np.full((1, 1, 2, 2), 2 * 5 + 2, np.int32))
    ones = dev(np.ones((1, 1, 2, 2), np.float32))
    with racecheck():
        dx = host(pool.maxpool2d_backward(ones, arg, (1, 1, 5, 5)))
    expect = np.zeros((1, 1, 5, 5), np.float32)
    expect[0, 0, 2, 2] = 4.0
    assert_equal(dx, expect, "dx")
    assert_equal(host(pool.maxpool2d_backward(ones, arg, (1, 1, 5, 5), version="gather", size=3, stride=2)), expect, "dx (gather)")


# ---------------------------------------------------------------- elementwise

@pytest.mark.task_1_1
def test_relu_forward_backward(rng):
    x = randn(rng, 3, 5, 7)  # 105 elements: several grid-stride trips on the simulator
    x[0, 0, :3] = 0.0
    y = elementwise.relu_forward(dev(x), out=nan_out(x.shape))
    assert_equal(host(y), ref.relu_forward(x), "relu forward")
    dy = randn(rng, *x.shape)
    dx = elementwise.relu_backward(dev(dy), y, out=nan_out(x.shape))
    assert_equal(host(dx), ref.relu_backward(dy, ref.relu_forward(x)), "relu backward")


@pytest.mark.parametrize("p,seed", [(0.5, 7), (0.25, 2**32 + 3), (0.0, 1), (0.9, 123456789)])
@pytest.mark.task_1_2
def test_dropout_mask_is_bit_identical(rng, p, seed):
    seed += int(rng.integers(1 << 20))  # the mask depends on the seed: from the grading seed too, no table of masks passes
    x = randn(rng, 4, 37)
    y = elementwise.dropout(dev(x), p, seed, out=nan_out(x.shape))
    assert_equal(host(y), ref.dropout_forward(x, p, seed), "dropout forward")
    dy = randn(rng, 4, 37)
    assert_equal(host(elementwise.dropout(dev(dy), p, seed)), ref.dropout_backward(dy, p, seed), "dropout backward")


@pytest.mark.task_1_2
def test_dropout_hash_device_function_matches_numpy():
    # the kernel's keep decision is exactly `hash32 >= threshold`: check it on ones, p ~ 1/2
    n = 150
    y = host(elementwise.dropout(dev(np.ones(n, np.float32)), 0.5, seed=1))
    assert_equal(y > 0, dropout_hash.keep_mask(1, n, 0.5), "kept elements")


def test_fill_writes_every_element():
    buf = nan_out((3, 41))
    elementwise.fill(buf, 2.5)
    assert_equal(host(buf), np.full((3, 41), 2.5, np.float32), "filled buffer")


# ---------------------------------------------------------------- reductions, loss, optimizer

@pytest.mark.parametrize("version,trans_a,trans_b", [("tiled", False, False), ("tiled", True, True),
                                                     ("tiled_padded", False, True)])
@pytest.mark.task_5_1
def test_gemm_tiled_loads_each_input_element_n_over_t_times_through_shared_memory(rng, version, trans_a, trans_b):
    """The point of tiling, counted by the race checker: each element of A is loaded from global
    memory once per column of tiles (N / T times), each of B once per row of tiles (M / T), and
    the multiply-adds read shared memory. A naive loop inside the tiled kernel gives the same
    numbers but loads each element of A N times and of B M times: it fails here."""
    if not SIM:
        pytest.skip("counted by the race checker, on the simulator")
    t, m, k, n = 4, 8, 8, 12
    a = randn(rng, k, m) if trans_a else randn(rng, m, k)
    b = randn(rng, n, k) if trans_b else randn(rng, k, n)
    with racecheck() as races:
        c = gemm.gemm(dev(a), dev(b), trans_a, trans_b, out=nan_out((m, n)), version=version, tile=t)
    assert_close(host(c), (a.T if trans_a else a) @ (b.T if trans_b else b), **TINY)
    name = "gemm_tiled_padded" if version == "tiled_padded" else "gemm_tiled"
    loads_a, loads_b = races.count(name, "global", "read", "a"), races.count(name, "global", "read", "b")
    assert loads_a <= a.size * math.ceil(n / t), f"{loads_a / a.size:g} loads of each element of A from global memory; tiles of {t} need {math.ceil(n / t)}"
    assert loads_b <= b.size * math.ceil(m / t), f"{loads_b / b.size:g} loads of each element of B from global memory; tiles of {t} need {math.ceil(m / t)}"
    shared = races.count(name, "shared", "read")
    assert shared >= m * n * k, f"{shared} reads of shared memory for {m * n * k} multiply-adds: the products must come from the staged tiles"


@pytest.mark.parametrize("shape", [(5, 3, 4, 7), (1, 2, 1, 1), (70, 3), (131,)])
def test_sum_over_batch(rng, shape):
    x = randn(rng, *shape)
    axes = tuple(i for i in range(x.ndim) if i != 1) if x.ndim > 1 else (0,)
    expect = x.sum(axis=axes).reshape(-1) * (0.5 if x.ndim == 1 else 1.0)
    got = reduce.sum_over_batch(dev(x), scale=0.5 if x.ndim == 1 else 1.0, out=nan_out(expect.shape))
    assert_close(host(got), expect, **TINY)


@pytest.mark.parametrize("n,blocks", [(1, None), (37, 1), (131, 2), (200, 3)])
@pytest.mark.task_7_1
def test_block_sum(rng, n, blocks):
    x = randn(rng, n)
    with racecheck():  # several blocks finish into one number: only an atomic add is right
        got = host(reduce.block_sum(dev(x), out=nan_out((1,)), blocks=blocks))
    assert_close(got, np.array([x.astype(np.float64).sum()], np.float32), **TINY)


@pytest.mark.parametrize("n,blocks", [(200, 3), (64, 2)])
@pytest.mark.task_7_1
def test_block_sum_does_one_atomic_per_block(rng, n, blocks):
    """What the task teaches, counted by the race checker: each element is read once, the block
    reduces in shared memory, and only its total goes to out[0]: one atomic add per block (one
    atomic per thread gives the same number, serialising every thread on one address)."""
    if not SIM:
        pytest.skip("counted by the race checker, on the simulator")
    x = randn(rng, n)
    with racecheck() as races:
        got = host(reduce.block_sum(dev(x), out=nan_out((1,)), blocks=blocks))
    assert_close(got, np.array([x.astype(np.float64).sum()], np.float32), **TINY)
    atomics = races.count("block_sum_kernel", "global", "atomic")
    assert atomics == blocks, f"{atomics} atomic adds for {blocks} blocks: one per block, by one thread, after the tree"
    assert races.count("block_sum_kernel", "global", "read", "x") == n, "each element of x is read once"
    assert races.count("block_sum_kernel", "shared", "read") > 0, "the block's partial sums are combined in shared memory"


@pytest.mark.task_7_1
def test_block_sum_of_a_4d_array_and_exact_small_integers():
    x = np.arange(2 * 3 * 5 * 7, dtype=np.float32).reshape(2, 3, 5, 7) % 9  # integers: every order sums exactly
    assert_equal(host(reduce.block_sum(dev(x), blocks=2)), np.array([x.sum()], np.float32), "block_sum")


@pytest.mark.task_4_1
def test_softmax_cross_entropy_matches_and_is_stable(rng):
    logits = randn(rng, 7, 10)
    logits[0] *= 1e4  # huge logits: exp would overflow without the max subtraction
    logits[1] = [1000.0, -1000.0] * 5
    labels = rng.integers(0, 10, 7).astype(np.int32)
    loss_ref, d_ref = ref.softmax_cross_entropy(logits, labels)
    loss, d = softmax.softmax_cross_entropy(dev(logits), labels, out=nan_out(logits.shape))
    assert loss.shape == (1,) and np.isfinite(host(loss)).all() and np.isfinite(host(d)).all()
    assert_close(host(loss), loss_ref, **TINY)
    assert_close(host(d), d_ref, **TINY)
    loss2, _ = softmax.softmax_cross_entropy(dev(logits), dev(labels))  # labels already on the device
    assert_close(host(loss2), loss_ref, **TINY)


@pytest.mark.task_4_1
def test_softmax_cross_entropy_bad_device_label_gives_nan_not_a_crash(rng):
    loss, _ = softmax.softmax_cross_entropy(dev(randn(rng, 2, 3)), dev(np.array([0, 3], np.int32)))
    assert np.isnan(host(loss)[0])


def test_sgd_update_matches_reference(rng):
    w, g, v = randn(rng, 101), randn(rng, 101), randn(rng, 101)
    dw, dg, dv = dev(w), dev(g), dev(v)
    optim.sgd_update(dw, dg, dv, lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref.sgd_update(w, g, v, lr=0.1, momentum=0.9, weight_decay=5e-4)
    assert_close(host(dv), v, **TINY)
    assert_close(host(dw), w, **TINY)


def test_axpy_on_both_backends(be, rng):
    y, x = randn(rng, 101), randn(rng, 101)
    dy = be.asarray(y.copy())  # the numpy backend's asarray may return y itself
    be.axpy(dy, -0.5, be.asarray(x))
    assert_close(be.to_numpy(dy), y - 0.5 * x, **TINY)
    with pytest.raises(ValueError, match="axpy"):
        be.axpy(dy, 1.0, be.asarray(x[:5]))


def test_every_backend_has_every_op(be):
    from minasgd.backends import OPS

    assert [op for op in OPS if not callable(getattr(be, op, None))] == []


# ---------------------------------------------------------------- the backend contract (numpy and cuda)

def test_memory_ops(be):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    d = be.asarray(a)
    assert_equal(be.to_numpy(d), a, "asarray round trip")
    z = be.zeros((5, 7))
    assert_equal(be.to_numpy(z), np.zeros((5, 7), np.float32), "zeros")
    assert be.to_numpy(z).dtype == np.float32
    dst = be.zeros((3, 4))
    be.copy_into(dst, d)  # device to device
    assert_equal(be.to_numpy(dst), a, "device-to-device copy")
    be.copy_into(dst, a * 2)  # from the host
    be.synchronize()
    assert_equal(be.to_numpy(dst), a * 2, "host-to-device copy")
    with pytest.raises(ValueError, match="shapes differ"):
        be.copy_into(dst, be.zeros((4, 3)))
    assert isinstance(be.NAME, str) and isinstance(be.DEVICE, str)


def test_views_of_one_flat_parameter_vector(be, rng):
    """The model keeps all parameters in ONE flat buffer and hands layers reshaped slices of it."""
    w, b = randn(rng, 3, 2, 3, 3), randn(rng, 3)
    wl, bl = randn(rng, 4, 12), randn(rng, 4)
    flat = be.asarray(np.concatenate([w.ravel(), b, wl.ravel(), bl]))
    o = [0, w.size, w.size + 3, w.size + 3 + wl.size, w.size + 3 + wl.size + 4]
    w_v, b_v = flat[o[0]:o[1]].reshape(3, 2, 3, 3), flat[o[1]:o[2]]
    wl_v, bl_v = flat[o[2]:o[3]].reshape(4, 12), flat[o[3]:o[4]]
    x = randn(rng, 1, 2, 5, 5)
    y = be.conv2d_forward(be.asarray(x), w_v, b_v, 2, 1)  # (1, 3, 3, 3)
    y_ref = ref.conv2d_forward(x, w, b, 2, 1)
    assert_close(be.to_numpy(y), y_ref, **TINY)
    h = randn(rng, 2, 12)
    z = be.linear_forward(be.asarray(h), wl_v, bl_v)
    assert_close(be.to_numpy(z), ref.linear_forward(h, wl, bl), **TINY)
    # an optimizer step on the whole buffer updates the layer views in place
    g = be.asarray(np.ones(o[4], np.float32))
    v = be.zeros((o[4],))
    be.sgd_update(flat, g, v, lr=0.5)
    assert_close(be.to_numpy(w_v), w - 0.5, **TINY)
    # and a gradient can be copied into a view of a flat gradient buffer
    grads = be.zeros((o[4],))
    be.copy_into(grads[o[2]:o[3]].reshape(4, 12), be.asarray(wl))
    assert_equal(be.to_numpy(grads)[o[2]:o[3]], wl.ravel(), "gradient view")


@pytest.mark.parametrize("be", ["cuda"], indirect=True)
def test_every_op_matches_the_reference(be, rng):
    """One small forward and backward pass through every op: values, dtypes and shapes.

    Only for backends other than the reference: the numpy backend is checked against finite
    differences and direct loops in test_reference_ops.py, and for the contract just below.
    """
    x, w, b = randn(rng, 2, 3, 7, 6), randn(rng, 4, 3, 3, 3), randn(rng, 4)
    y = be.conv2d_forward(be.asarray(x), be.asarray(w), be.asarray(b), 2, 1)
    assert_close(be.to_numpy(y), ref.conv2d_forward(x, w, b, 2, 1), **TINY)
    dy = randn(rng, 2, 4, 4, 3)
    for got, expect in zip(be.conv2d_backward(be.asarray(dy), be.asarray(x), be.asarray(w), 2, 1), ref.conv2d_backward(dy, x, w, 2, 1)):
        assert_close(be.to_numpy(got), expect, **TINY)
    dx, dw, db = be.conv2d_backward(be.asarray(dy), be.asarray(x), be.asarray(w), 2, 1, need_dx=False)
    assert dx is None and dw.shape == w.shape and db.shape == b.shape

    p, arg = be.maxpool2d_forward(be.asarray(x), 3, 2)
    p_ref, arg_ref = ref.maxpool2d_forward(x, 3, 2)
    assert_equal(be.to_numpy(p), p_ref, "max-pool")
    assert_equal(be.to_numpy(arg), arg_ref, "argmax")
    dp = randn(rng, *p_ref.shape)
    assert_close(be.to_numpy(be.maxpool2d_backward(be.asarray(dp), arg, x.shape)), ref.maxpool2d_backward(dp, arg_ref, x.shape), **TINY)

    r = be.relu_forward(be.asarray(x))
    assert_equal(be.to_numpy(be.relu_backward(be.asarray(x), r)), ref.relu_backward(x, ref.relu_forward(x)), "relu backward")
    assert_equal(be.to_numpy(be.dropout_forward(be.asarray(x), 0.5, 3)), ref.dropout_forward(x, 0.5, 3), "dropout forward")
    assert_equal(be.to_numpy(be.dropout_backward(be.asarray(x), 0.5, 3)), ref.dropout_backward(x, 0.5, 3), "dropout backward")

    h, wl, bl = randn(rng, 3, 17), randn(rng, 13, 17), randn(rng, 13)
    assert_close(be.to_numpy(be.linear_forward(be.asarray(h), be.asarray(wl), be.asarray(bl))), ref.linear_forward(h, wl, bl), **TINY)
    dz = randn(rng, 3, 13)
    for got, expect in zip(be.linear_backward(be.asarray(dz), be.asarray(h), be.asarray(wl)), ref.linear_backward(dz, h, wl)):
        assert be.to_numpy(got).dtype == np.float32
        assert_close(be.to_numpy(got), expect, **TINY)

    labels = np.array([3, 0, 12], np.int32)
    loss, dl = be.softmax_cross_entropy(be.asarray(dz), labels)
    loss_ref, dl_ref = ref.softmax_cross_entropy(dz, labels)
    assert loss.shape == (1,) and be.to_numpy(loss).dtype == np.float32
    assert_close(be.to_numpy(loss), loss_ref, **TINY)
    assert_close(be.to_numpy(dl), dl_ref, **TINY)


def test_every_op_keeps_the_contract(be, rng):
    """Dtypes, shapes and fresh outputs of every op, on every backend (the reference included)."""
    x, w, b = randn(rng, 2, 3, 7, 6), randn(rng, 4, 3, 3, 3), randn(rng, 4)
    y = be.conv2d_forward(be.asarray(x), be.asarray(w), be.asarray(b), 2, 1)
    assert tuple(y.shape) == (2, 4, 4, 3) and be.to_numpy(y).dtype == np.float32
    dx, dw, db = be.conv2d_backward(be.asarray(randn(rng, 2, 4, 4, 3)), be.asarray(x), be.asarray(w), 2, 1)
    assert (tuple(dx.shape), tuple(dw.shape), tuple(db.shape)) == (x.shape, w.shape, b.shape)
    p, arg = be.maxpool2d_forward(be.asarray(x), 3, 2)
    assert tuple(p.shape) == (2, 3, 3, 2) and be.to_numpy(arg).dtype == np.int32
    for size_stride in ((), (3, 2)):
        dx = be.maxpool2d_backward(be.asarray(randn(rng, 2, 3, 3, 2)), arg, x.shape, *size_stride)
        assert tuple(dx.shape) == x.shape and be.to_numpy(dx).dtype == np.float32
    loss, dl = be.softmax_cross_entropy(be.asarray(randn(rng, 3, 13)), np.array([3, 0, 12], np.int32))
    assert loss.shape == (1,) and be.to_numpy(loss).dtype == np.float32 and tuple(dl.shape) == (3, 13)
    h = be.asarray(randn(rng, 3, 17))
    assert all(be.to_numpy(a).dtype == np.float32
               for a in be.linear_backward(be.asarray(randn(rng, 3, 13)), h, be.asarray(randn(rng, 13, 17))))


@pytest.mark.parametrize(
    "op,args,message",
    [
        ("conv2d_forward", ((1, 3, 5, 5), (2, 4, 3, 3), (2,)), "channels"),
        ("conv2d_forward", ((3, 5, 5), (2, 3, 3, 3), (2,)), "4-D"),
        ("maxpool2d_forward", ((1, 1, 2, 2),), "does not fit"),
        ("linear_forward", ((2, 3), (4, 5), (4,)), "features"),
        ("relu_backward", ((2, 3), (3, 2)), "shapes differ"),
    ],
)
def test_bad_shapes_fail_like_the_reference(be, op, args, message):
    arrays = [be.zeros(s) for s in args]
    with pytest.raises(ValueError, match=message):
        getattr(be, op)(*arrays)


def test_bad_labels_and_dropout_p_fail_like_the_reference(be):
    with pytest.raises(ValueError, match="labels"):
        be.softmax_cross_entropy(be.zeros((2, 3)), np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="dropout"):
        be.dropout_forward(be.zeros((3,)), 1.0, 0)


def test_backend_exposes_every_op():
    from minasgd import backends
    from minasgd.backends import cuda_backend

    missing = [name for name in backends.OPS if not callable(getattr(cuda_backend, name, None))]
    assert not missing
    assert cuda_backend.NAME == "cuda" and cuda_backend.CONV_VERSION in conv.VERSIONS and cuda_backend.GEMM_VERSION in gemm.VERSIONS
    assert backends.get("cuda").DEVICE == cuda_backend.DEVICE


# ---------------------------------------------------------------- real sizes on a real GPU

def _alexnet_mini_convs(batch=128):
    """(N, C, H, W, K, R, S, stride, pad) of each conv layer, read off Model("alexnet-mini")."""
    from minasgd.workbench import layer_shapes

    return [(*L["x"], L["w"][0], *L["w"][2:], L["stride"], L["pad"]) for L in layer_shapes("alexnet-mini", batch)["conv"]]


ALEXNET_MINI_CONVS = _alexnet_mini_convs()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ALEXNET_MINI_CONVS)
def test_gpu_conv_real_sizes(rng, case):
    x, w, b, stride, pad = _conv_case(rng, case)
    y_ref = ref.conv2d_forward(x, w, b, stride, pad)
    for version in conv.VERSIONS:
        y = conv.conv2d_forward(dev(x), dev(w), dev(b), stride, pad, out=nan_out(y_ref.shape), version=version)
        assert_close(host(y), y_ref, **REAL)
    dy = randn(rng, *y_ref.shape)
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(dy, x, w, stride, pad)
    for got, expect in zip(conv.conv2d_backward(dev(dy), dev(x), dev(w), stride, pad), (dx_ref, dw_ref, db_ref)):
        scale = max(1.0, float(np.abs(expect).max()))
        assert_close(host(got) / scale, expect / scale, **REAL)
    scale_dx, scale_dw = max(1.0, float(np.abs(dx_ref).max())), max(1.0, float(np.abs(dw_ref).max()))
    dx = conv.conv2d_backward_data(dev(dy), dev(w), x.shape, stride, pad, out=nan_out(x.shape), version="naive")
    assert_close(host(dx) / scale_dx, dx_ref / scale_dx, **REAL)
    dw = conv.conv2d_backward_filter(dev(dy), dev(x), w.shape, stride, pad, out=nan_out(w.shape), version="naive")
    assert_close(host(dw) / scale_dw, dw_ref / scale_dw, **REAL)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(128, 32, 32, 32), (128, 64, 15, 15), (128, 128, 7, 7)])
def test_gpu_pool_relu_dropout_real_sizes(rng, shape):
    x = randn(rng, *shape)
    y_ref, arg_ref = ref.maxpool2d_forward(x, 3, 2)
    y, arg = pool.maxpool2d_forward(dev(x), 3, 2)
    assert_equal(host(y), y_ref, "max-pool")
    assert_equal(host(arg), arg_ref, "argmax")
    dy = randn(rng, *y_ref.shape)
    assert_close(host(pool.maxpool2d_backward(dev(dy), arg, shape)), ref.maxpool2d_backward(dy, arg_ref, shape), **REAL)
    assert_equal(host(elementwise.relu_forward(dev(x))), ref.relu_forward(x), "relu")
    assert_equal(host(elementwise.dropout(dev(x), 0.5, 99)), ref.dropout_forward(x, 0.5, 99), "dropout")


@pytest.mark.gpu
@pytest.mark.parametrize("n,d,m", [(128, 1152, 256), (128, 256, 10)])
def test_gpu_linear_real_sizes(rng, n, d, m):
    x, w, b = randn(rng, n, d), randn(rng, m, d), randn(rng, m)
    for version in gemm.VERSIONS:
        y = gemm.gemm(dev(x), dev(w), trans_b=True, bias=dev(b), version=version)
        assert_close(host(y), ref.linear_forward(x, w, b), **REAL)
    from minasgd.backends import cuda_backend as be

    dy = randn(rng, n, m)
    for got, expect in zip(be.linear_backward(dev(dy), dev(x), dev(w)), ref.linear_backward(dy, x, w)):
        assert_close(host(got), expect, **REAL)


@pytest.mark.gpu
def test_gpu_softmax_and_sgd_real_sizes(rng):
    logits, labels = randn(rng, 128, 10) * 30, rng.integers(0, 10, 128).astype(np.int32)
    loss, d = softmax.softmax_cross_entropy(dev(logits), labels)
    loss_ref, d_ref = ref.softmax_cross_entropy(logits, labels)
    assert_close(host(loss), loss_ref, **REAL)
    assert_close(host(d), d_ref, **REAL)
    w, g, v = randn(rng, 425_000), randn(rng, 425_000), randn(rng, 425_000)
    dw, dv = dev(w), dev(v)
    optim.sgd_update(dw, dev(g), dv, 0.01, 0.9, 5e-4)
    ref.sgd_update(w, g, v, 0.01, 0.9, 5e-4)
    assert_close(host(dw), w, **REAL)
    assert_close(host(dv), v, **REAL)


# ---------------------------------------------------------------- the kernel benchmark

def test_bench_refuses_to_time_the_simulator(capsys):
    from minasgd import bench_kernels
    from minasgd.cli import main

    if bench_kernels.no_gpu_reason() is None:
        pytest.skip("a real GPU is present")
    result = bench_kernels.run()
    assert set(result) == {"skipped"} and "real" in result["skipped"]
    assert capsys.readouterr().out == ""  # the library prints nothing; the command line says why
    assert main(["bench", "kernels"]) == 0
    assert capsys.readouterr().out.strip().count("\n") == 0  # one line


def test_bench_cases_all_run_at_tiny_sizes():
    """Every benchmark case (ours, the other version, and PyTorch on the CPU when installed) runs."""
    import importlib.util

    from minasgd import bench_kernels

    torch_device = "cpu" if importlib.util.find_spec("torch") else None
    from minasgd.workbench import layer_shapes

    from minasgd.kernels import registry

    cases = bench_kernels.build_cases("micro", batch=1, torch_device=torch_device, tile=4)
    net = layer_shapes("micro", 1)
    # one row per op the registry marks for the table, in its order (no hand-kept count of ops)
    rows = list(dict.fromkeys(c.name for c in registry.cases(net, ref, (4,)) if c.bench))
    assert [case.name for case in cases] == rows and len(rows) >= 3 * len(net["conv"]) + 2 * len(net["pool"]) + 3 * len(net["fc"]) + 5
    for case in cases:
        for fn in (case.ours, case.alt, case.torch):
            if fn is not None:
                fn()
        assert case.work > 0 and case.unit in ("GFLOP/s", "GB/s")
    assert any(case.name.startswith("sgd") and f"{net['num_params']:,} params" in case.shape for case in cases)


@pytest.mark.gpu
def test_gpu_bench_runs():
    from minasgd import bench_kernels

    result = bench_kernels.run()
    assert result["kernels"] and all(r["ours_ms"] > 0 for r in result["kernels"])

"""The NumPy fast path (`numpy_fast`) against the readable reference (`numpy_backend`), plus gradchecks."""

import threading

import numpy as np
import pytest

from minasgd import backends
from minasgd.backends import cpu_loops
from minasgd.backends import numpy_backend as ref
from minasgd.backends import numpy_fast as fast

from gradcheck import assert_close, numeric_grad
from test_reference_ops import CONV_CASES

POOL_SHAPES = [(2, 3, 7, 7), (3, 2, 8, 9), (1, 1, 3, 3), (2, 2, 15, 15), (1, 2, 4, 6)]
# Batches the fast path splits into several matrix products, the last one short:
# (N, C, H, W, K, R, S, stride, pad), with images_per_product 1, 2 and 2.
CHUNKED_CONV_CASES = [(3, 2, 17, 18, 3, 3, 3, 1, 1), (5, 3, 12, 11, 4, 3, 3, 1, 1), (5, 2, 23, 21, 3, 5, 3, 2, 2)]


def test_get_numpy_is_the_fast_path_and_the_reference_stays_reachable():
    assert backends.get("numpy") is fast
    assert backends.get("numpy-reference") is ref
    for op in backends.OPS:
        assert callable(getattr(fast, op)), op


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CONV_CASES + [(3, 4, 11, 10, 5, 3, 3, 1, 1)] + CHUNKED_CONV_CASES)
def test_conv_matches_reference(case, dtype):
    n, c, h, w, k, r, s, stride, pad = case
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c, r, s)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    for _ in range(2):  # the second call runs on the kept buffers
        y = fast.conv2d_forward(x, wt, b, stride, pad)
        assert y.dtype == dtype and y.flags.c_contiguous
        assert_close(y, ref.conv2d_forward(x, wt, b, stride, pad), **tol)
        dy = rng.standard_normal(y.shape).astype(dtype)
        for need_dx in (True, False):
            got = fast.conv2d_backward(dy, x, wt, stride, pad, need_dx)
            want = ref.conv2d_backward(dy, x, wt, stride, pad, need_dx)
            for g, e in zip(got, want):
                if e is None:
                    assert g is None
                else:
                    assert_close(g, e, **tol)


@pytest.mark.parametrize("case", CHUNKED_CONV_CASES)
def test_chunked_cases_really_take_several_products(case):
    n, c, h, w, k, r, s, stride, pad = case
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    chunk = fast.images_per_product(p, q)
    assert chunk < n and (chunk == 1 or n % chunk != 0)  # several products; if of 2+ images, the last one short


def test_conv_backward_sees_an_input_changed_in_place_since_the_forward():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    wt = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = fast.conv2d_forward(x, wt, np.zeros(4, np.float32), 1, 1)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    x[1, 2, 3, 4] += 5.0  # same array object, new values: nothing from the forward may be reused
    assert_close(fast.conv2d_backward(dy, x, wt, 1, 1)[1], ref.conv2d_backward(dy, x, wt, 1, 1)[1])


def test_conv_results_are_fresh_arrays_not_kept_buffers():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    wt = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    y1 = fast.conv2d_forward(x, wt, b, 1, 1)
    dx1, dw1, _ = fast.conv2d_backward(y1, x, wt, 1, 1)
    first = (y1.copy(), dx1.copy(), dw1.copy())
    fast.conv2d_forward(-x, wt, b, 1, 1)
    fast.conv2d_backward(-y1, -x, wt, 1, 1)
    for kept, now in zip(first, (y1, dx1, dw1)):
        np.testing.assert_array_equal(kept, now)


@pytest.mark.parametrize("case", CONV_CASES[:3])
def test_fast_conv_gradcheck(case):
    n, c, h, w, k, r, s, stride, pad = case
    rng = np.random.default_rng(0)
    x, wt, b = rng.standard_normal((n, c, h, w)), rng.standard_normal((k, c, r, s)), rng.standard_normal(k)
    cw = rng.standard_normal(fast.conv2d_forward(x, wt, b, stride, pad).shape)
    f = lambda: float((fast.conv2d_forward(x, wt, b, stride, pad) * cw).sum())
    num_x, num_w = numeric_grad(f, x), numeric_grad(f, wt)  # perturbs x in place between calls
    dx, dw, db = fast.conv2d_backward(cw, x, wt, stride, pad)
    assert_close(dx, num_x, rtol=1e-5, atol=1e-6)
    assert_close(dw, num_w, rtol=1e-5, atol=1e-6)
    assert_close(db, cw.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size, stride", [(3, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_maxpool_matches_reference_including_ties(shape, size, stride):
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal(shape).astype(np.float32), 0)  # ReLU output: many tied zeros
    x[..., :2, :] = 1.0  # and whole tied rows
    y, argmax = fast.maxpool2d_forward(x, size, stride)
    want_y, want_argmax = ref.maxpool2d_forward(x, size, stride)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(argmax, want_argmax)
    assert argmax.dtype == np.int32


def test_threads_do_not_share_buffers():
    rng = np.random.default_rng(5)
    wt = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    b = np.zeros(16, np.float32)
    inputs = [rng.standard_normal((8, 8, 16, 16)).astype(np.float32) for _ in range(2)]
    wants = [ref.conv2d_backward(ref.conv2d_forward(x, wt, b, 1, 1), x, wt, 1, 1) for x in inputs]
    errors = []

    def train(x, want):
        for _ in range(20):
            dx, dw, _ = fast.conv2d_backward(fast.conv2d_forward(x, wt, b, 1, 1), x, wt, 1, 1)
            if not (np.allclose(dw, want[1], rtol=1e-3, atol=1e-3) and np.allclose(dx, want[0], rtol=1e-3, atol=1e-3)):
                errors.append("mismatch")

    threads = [threading.Thread(target=train, args=xw) for xw in zip(inputs, wants)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_kept_buffers_stay_under_the_byte_cap(monkeypatch):
    monkeypatch.setattr(fast, "_MAX_BYTES", 64 * 1024)
    # this thread's buffers start empty, whatever other tests in this process (an xdist worker) kept
    monkeypatch.setattr(fast._local, "buffers", {}, raising=False)
    rng = np.random.default_rng(6)
    wt = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    for n in range(1, 40):  # a new batch size every call: new buffers every call
        x = rng.standard_normal((n, 3, 8, 8)).astype(np.float32)
        assert_close(fast.conv2d_forward(x, wt, np.zeros(4, np.float32), 1, 1),
                     ref.conv2d_forward(x, wt, np.zeros(4, np.float32), 1, 1))
        assert sum(b.nbytes for b in fast._buffers().values()) <= 64 * 1024 or len(fast._buffers()) <= 2


@pytest.mark.parametrize("size, stride", [(3, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_maxpool_backward_matches_reference(shape, size, stride):
    rng = np.random.default_rng(7)
    x = np.maximum(rng.standard_normal(shape).astype(np.float32), 0)  # ties, and overlapping windows sharing a max
    y, argmax = fast.maxpool2d_forward(x, size, stride)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    assert_close(fast.maxpool2d_backward(dy, argmax, x.shape, size, stride),
                 ref.maxpool2d_backward(dy, argmax, x.shape, size, stride), rtol=1e-6, atol=1e-6)


def test_maxpool_backward_refuses_an_argmax_outside_the_plane():
    dy = np.ones((1, 2, 2, 2), np.float32)
    for bad in (9, -1):
        argmax = np.zeros((1, 2, 2, 2), np.int32)
        argmax[0, 1, 1, 0] = bad
        with pytest.raises(IndexError, match="outside its input plane"):
            fast.maxpool2d_backward(dy, argmax, (1, 2, 3, 3))
    with pytest.raises(ValueError, match="images and channels"):
        fast.maxpool2d_backward(dy, np.zeros((1, 2, 2, 2), np.int32), (2, 2, 3, 3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_backward_matches_reference(dtype):
    rng = np.random.default_rng(8)
    y = np.maximum(rng.standard_normal((3, 4, 5, 7)), 0).astype(dtype)
    dy = rng.standard_normal(y.shape).astype(dtype)
    got = fast.relu_backward(dy, y)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, ref.relu_backward(dy, y))


# ---------------------------------------------------------------- the compiled loops, one by one
# Outputs start as NaN (argmax as -1), so an element a loop forgets to write fails the test.

@pytest.mark.parametrize("stride, pad", [(1, 0), (1, 2), (2, 1), (3, 2)])
def test_im2col_and_col2im_loops_match_the_reference(stride, pad):
    rng = np.random.default_rng(9)
    b, c, h, w, r, s = 3, 2, 9, 8, 3, 4
    x = rng.standard_normal((b, c, h, w))
    p, q = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.full((c, r, s, b, p, q), np.nan)
    cpu_loops.im2col(xp, stride, cols)
    np.testing.assert_array_equal(cols.reshape(c * r * s, b * p * q), ref.im2col(x, r, s, stride, pad))
    dcols = rng.standard_normal(cols.shape)
    dxp = np.full(xp.shape, np.nan)
    cpu_loops.col2im(dcols, stride, dxp)
    want = ref.col2im(dcols.reshape(c * r * s, b * p * q), x.shape, r, s, stride, pad, p, q)
    assert_close(dxp[:, :, pad : pad + h, pad : pad + w], want, rtol=1e-12, atol=1e-12)


def test_maxpool_and_relu_loops_write_every_output():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 9, 7)).astype(np.float32)
    y, argmax = np.full((2, 3, 4, 3), np.nan, np.float32), np.full((2, 3, 4, 3), -1, np.int32)
    cpu_loops.maxpool_forward(x, 3, 2, y, argmax)
    want_y, want_argmax = ref.maxpool2d_forward(x, 3, 2)
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(argmax, want_argmax)
    dx = np.full(x.shape, np.nan, np.float32)
    cpu_loops.maxpool_backward(y, argmax, dx)
    assert_close(dx, ref.maxpool2d_backward(y, argmax, x.shape), rtol=1e-6, atol=1e-6)
    relu_dx = np.full(x.size, np.nan, np.float32)
    cpu_loops.relu_backward(x.ravel(), -x.ravel(), relu_dx)
    np.testing.assert_array_equal(relu_dx.reshape(x.shape), ref.relu_backward(x, -x))


# ---------------------------------------------------------------- the loops on more than one thread
# Each compiled loop also runs split across threads (`prange`, issue 24). Every thread owns its
# outputs and every sum keeps the serial order, so the results must be bitwise the serial ones.

@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr(cpu_loops, "PARALLEL_MIN_ELEMENTS", 0)  # the small test arrays go parallel too
    before = cpu_loops.threads()
    assert cpu_loops.use_threads(2) == 2, "the Numba thread pool has fewer than 2 threads"
    yield
    cpu_loops.use_threads(before)


def test_each_loop_on_two_threads_equals_the_serial_one(two_threads):
    """float32, the training dtype: only it ever runs in parallel (gradchecks run float64 serially),
    and each dtype costs the parallel versions a compile (~25 s from a clean clone under load)."""
    dtype = np.float32
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 5, 11, 9)).astype(dtype)
    xp = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    stride, r, s = 2, 3, 4
    p, q = (xp.shape[2] - r) // stride + 1, (xp.shape[3] - s) // stride + 1
    y, argmax = np.empty((3, 5, 5, 4), dtype), np.empty((3, 5, 5, 4), np.int32)
    dcols = rng.standard_normal((5, r, s, 3, p, q)).astype(dtype)
    runs = {  # name: (args, the indices of the outputs among them)
        "im2col": ((xp, stride, np.empty((5, r, s, 3, p, q), dtype)), [2]),
        "col2im": ((dcols, stride, np.empty_like(xp)), [2]),
        "maxpool_forward": ((x, 3, 2, y, argmax), [3, 4]),
        "maxpool_backward": ((rng.standard_normal(y.shape).astype(dtype), None, np.empty_like(x)), [2]),
        "relu_backward": ((x.ravel(), -x.ravel()[::-1].copy(), np.empty(x.size, dtype)), [2]),
    }
    for name, (args, outputs) in runs.items():
        loop = getattr(cpu_loops, name)
        if name == "maxpool_backward":
            args = (args[0], argmax, args[2])  # the argmax the forward just wrote
        serial_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        for k in outputs:  # outputs start as garbage: a loop must write every element
            serial_args[k][...] = np.nan if serial_args[k].dtype.kind == "f" else -1
            args[k][...] = 7 if args[k].dtype.kind == "f" else 12345
        loop.serial(*serial_args)
        loop(*args)  # two threads: the parallel version
        for k in outputs:
            np.testing.assert_array_equal(args[k], serial_args[k], err_msg=name)


def test_the_fast_backends_step_on_two_threads_equals_one_thread(two_threads):
    """conv, pooling and ReLU forward and backward at two threads: bitwise the one-thread results."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((5, 3, 13, 13)).astype(np.float32)
    w, b = rng.standard_normal((4, 3, 3, 3)).astype(np.float32), rng.standard_normal(4).astype(np.float32)

    def everything():
        y = fast.conv2d_forward(x, w, b, 2, 1)
        pooled, argmax = fast.maxpool2d_forward(np.maximum(y, 0), 3, 2)
        dy = fast.maxpool2d_backward(pooled, argmax, y.shape)
        return [y, pooled, dy, fast.relu_backward(dy, np.maximum(y, 0)), *fast.conv2d_backward(dy, x, w, 2, 1)]

    two = everything()
    cpu_loops.use_threads(1)
    for got, want in zip(two, everything()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threads", [2, 3])
def test_a_convolution_split_across_threads_equals_one_thread(two_threads, monkeypatch, threads):
    """Conv forward and backward with their chunks of images on 2 and 3 threads (10 chunks, 8
    groups of the weight gradient, a short last chunk): bitwise the one-thread results, every
    output written, each chunk's loop run serially on a worker thread with ONE BLAS thread, and
    the BLAS count the caller set back afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    rng = np.random.default_rng(13)
    x = rng.standard_normal((37, 3, 9, 9)).astype(np.float32)  # 81 outputs per plane: 4 images a chunk
    w, b = rng.standard_normal((5, 3, 3, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    dy = rng.standard_normal((37, 5, 9, 9)).astype(np.float32)
    seen = []

    def watching(loop):
        def run(*args):
            blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
            seen.append((threading.current_thread().name, max(blas)))
            return loop(*args)
        return run

    for name in ("im2col", "col2im"):
        monkeypatch.setattr(getattr(cpu_loops, name), "serial", watching(getattr(cpu_loops, name).serial))

    def everything():
        return [fast.conv2d_forward(x, w, b, 1, 1), *fast.conv2d_backward(dy, x, w, 1, 1)]

    cpu_loops.use_threads(1)
    one = everything()
    seen.clear()
    monkeypatch.setattr(cpu_loops, "threads", lambda: threads)  # 3 on a 2-core machine too
    with threadpool_limits(limits=2, user_api="blas"):
        split = everything()
        assert max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas") == 2
    for got, want in zip(split, one):
        assert not np.isnan(got).any()
        np.testing.assert_array_equal(got, want)
    workers = {name for name, _ in seen}
    assert len(workers) == threads and all(n.startswith("minasgd-conv") for n in workers), workers
    assert {blas for _, blas in seen} == {1}, seen


def test_small_outputs_stay_serial_on_two_threads(two_threads, monkeypatch):
    monkeypatch.setattr(cpu_loops, "PARALLEL_MIN_ELEMENTS", 100)
    calls = []
    for name in ("serial", "parallel"):
        monkeypatch.setattr(cpu_loops.relu_backward, name, lambda *a, name=name: calls.append(name))
    cpu_loops.relu_backward(*(np.zeros(99, np.float32) for _ in range(3)))
    cpu_loops.relu_backward(*(np.zeros(100, np.float32) for _ in range(3)))
    assert calls == ["serial", "parallel"]


def test_use_threads_refuses_nonsense():
    with pytest.raises(ValueError, match="1 or more"):
        cpu_loops.use_threads(0)

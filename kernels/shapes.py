"""Shape arithmetic and input checks shared by every backend (and the layers' shape formulas).

Each function validates its inputs and returns the output shape, raising a
one-line ValueError that names what is wrong. Backends call these before any
work, so wrong shapes fail the same way on the CPU and on the GPU.
"""


def _dims(name, shape, ndim, what):
    if len(shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(shape)}")


def conv2d_output_shape(x_shape, w_shape, stride, pad, b_shape=None):
    """x[N,C,H,W] * w[K,C,R,S] (+ b[K]) -> (N, K, P, Q)."""
    _dims("conv2d input x", x_shape, 4, "(N, C, H, W)")
    _dims("conv2d weight w", w_shape, 4, "(K, C, R, S)")
    n, c, h, w = x_shape
    k, wc, r, s = w_shape
    if wc != c:
        raise ValueError(f"conv2d: input has {c} channels but weight expects {wc} (w shape {tuple(w_shape)})")
    if b_shape is not None and tuple(b_shape) != (k,):
        raise ValueError(f"conv2d: bias must have shape ({k},), got {tuple(b_shape)}")
    if stride < 1 or pad < 0:
        raise ValueError(f"conv2d: need stride >= 1 and pad >= 0, got stride={stride} pad={pad}")
    p = (h + 2 * pad - r) // stride + 1
    q = (w + 2 * pad - s) // stride + 1
    if p < 1 or q < 1:
        raise ValueError(f"conv2d: a {r}x{s} filter does not fit a {h}x{w} input with pad {pad}")
    return (n, k, p, q)


def pool2d_output_shape(x_shape, size, stride):
    """Max-pool a (N, C, H, W) input with a size x size window -> (N, C, P, Q), floor mode."""
    _dims("maxpool2d input x", x_shape, 4, "(N, C, H, W)")
    n, c, h, w = x_shape
    if size < 1 or stride < 1:
        raise ValueError(f"maxpool2d: need size >= 1 and stride >= 1, got size={size} stride={stride}")
    if size > h or size > w:
        raise ValueError(f"maxpool2d: a {size}x{size} window does not fit a {h}x{w} input")
    return (n, c, (h - size) // stride + 1, (w - size) // stride + 1)


def linear_output_shape(x_shape, w_shape, b_shape=None):
    """x[N,D] w[M,D]^T (+ b[M]) -> (N, M)."""
    _dims("linear input x", x_shape, 2, "(N, D)")
    _dims("linear weight w", w_shape, 2, "(M, D)")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"linear: input has {x_shape[1]} features but weight expects {w_shape[1]}")
    if b_shape is not None and tuple(b_shape) != (w_shape[0],):
        raise ValueError(f"linear: bias must have shape ({w_shape[0]},), got {tuple(b_shape)}")
    return (x_shape[0], w_shape[0])


def check_same_shape(what, a_shape, b_shape):
    if tuple(a_shape) != tuple(b_shape):
        raise ValueError(f"{what}: shapes differ, {tuple(a_shape)} vs {tuple(b_shape)}")


def check_logits_labels(logits_shape, labels_shape):
    _dims("softmax_cross_entropy logits", logits_shape, 2, "(N, classes)")
    if tuple(labels_shape) != (logits_shape[0],):
        raise ValueError(
            f"softmax_cross_entropy: expected {logits_shape[0]} labels, got shape {tuple(labels_shape)}"
        )


def check_dropout_p(p):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")

"""The server's optimizer update, out of place and checked: a new parameter vector, or why not.

    update = CheckedUpdate(SGD(numpy_backend, n, momentum=0.0))   # or Adagrad(...)
    update.step_into(params, grad, lr, out)    # out = the updated params; `params` is only read

`ParameterServer` keeps its current parameters as an immutable snapshot that fetches send
without copying (`minasgd.ps.server`): an update must never write into them. So `step_into`
writes the result into a spare vector `out`, checks it, and only then does the server swap
`out` in. A result (or optimizer state) with NaN/Inf is simply not swapped in: the parameters
and the optimizer's state stay bit-identical and `step_into` returns the one-line reason (a
non-finite gradient, or an update that overflowed: two huge but finite pushes), which the
server sends back as Refused.

Cost per update, SGD (the default server, `--momentum-at worker`: w_new = w - lr*g): two passes
over three vectors (multiply, add) and one read pass to check, no copy, no temporary. With
server momentum the velocity is updated into a second spare vector and swapped the same way.
"""

import numpy as np

from ..optim import SGD


def all_finite(x):
    """True if no element of the float32 vector x is NaN or Inf.

    One read pass and no temporary: x.x is NaN or Inf whenever an element is. A sum of huge
    finite values can overflow to Inf as well; only then is each element checked (exactly)."""
    return bool(np.isfinite(np.dot(x, x))) or bool(np.isfinite(x).all())


def count_not_finite(x):
    return int(np.count_nonzero(~np.isfinite(x)))


class CheckedUpdate:
    """Wraps the server's optimizer (SGD or Adagrad): `step_into` computes out of place and
    changes nothing if the gradient or the result is not finite (it returns why)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.spare_velocity = None  # SGD: the velocity's next vector (swapped with the current one)

    def step_into(self, params, grad, lr, out):
        """out = params after one step with `grad` at `lr` (the optimizer's state moves on too);
        returns None, or why nothing changed (a one-line reason)."""
        if isinstance(self.optimizer, SGD) and not self.optimizer.weight_decay:
            return self._sgd_into(params, grad, np.float32(lr), out)
        return self._generic_into(params, grad, lr, out)

    def _sgd_into(self, params, grad, lr, out):
        """SGD: v_new = m v + g (skipped for m = 0), out = params - lr v_new; v swapped on success."""
        m, v = self.optimizer.momentum, self.optimizer.velocity
        step = grad
        if m:
            if self.spare_velocity is None:
                self.spare_velocity = np.empty_like(v)
            step = np.multiply(v, np.float32(m), out=self.spare_velocity)
            step += grad
        np.multiply(step, -lr, out=out)
        out += params
        if not all_finite(out):  # a NaN/Inf in grad or the new velocity makes one in out too (lr >= 0)
            return self._why(grad, out)
        if step is not grad:
            self.optimizer.velocity, self.spare_velocity = step, v
        return None

    def _generic_into(self, params, grad, lr, out):
        """Any optimizer: step a copy in place; its state is put back if the result is not finite."""
        saved = {k: np.array(v, dtype=np.float32, copy=True) for k, v in self.optimizer.state().items()}
        np.copyto(out, params)
        self.optimizer.step(out, grad, lr)
        state = self.optimizer.state().values()
        if not (all_finite(out) and all(all_finite(np.ravel(v)) for v in state)):
            self.optimizer.load_state(saved)
            return self._why(grad, out)
        return None

    @staticmethod
    def _why(grad, out):
        """Why the result is not finite: the gradient itself, or an overflowing update."""
        bad = count_not_finite(grad)
        if bad:
            return f"gradient has {bad} NaN/Inf values"
        bad = count_not_finite(out)
        what = f"{bad} parameters" if bad else "the optimizer's state"
        return f"the update would make {what} NaN/Inf; not applied"

    def state(self):
        return self.optimizer.state()

    def load_state(self, state):
        self.optimizer.load_state(state)

    def __getattr__(self, name):  # the wrapped optimizer's own attributes (velocity, momentum...)
        return getattr(self.optimizer, name)

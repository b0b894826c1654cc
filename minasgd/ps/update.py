"""The server's update rule, whole: how far a push moves the parameters, and the checked step.

    rule = UpdateRule(num_params, optimizer="sgd", momentum=0.0, staleness_lr=False, lr_scale=1.0,
                      push_fraction=1.0)
    scale = rule.scale(batches=4, staleness=2, lr_now=lambda: schedule(steps))
    params = rule.step(params, grad, scale, batches, in_use=lambda v: False)  # a NEW read-only vector

What a push means (`minasgd.ps.server` says who sends what):
- SGD: a push is the displacement the worker moved, applied as it is: the scale is 1, whatever the
  schedule did since the worker stepped. With the server's momentum m (`--momentum-at server`)
  the server keeps ONE velocity of pushed displacements, decayed by m per mini-batch (m**k for a
  push of k): v = m**k v + push, w -= (1 - m**k) / (1 - m) v.
- Adagrad: a push is a plain gradient sum, stepped at the schedule's lr now (times lr_scale).
- `push_fraction` (SGD): the fraction of every push that is applied. 1 adds each worker's steps as
  they are; 1 / N (`--lr-scaling average`) moves the parameters by the average of N workers'
  displacements: model averaging, the workers stepping locally as one process does. N is the
  run's --workers, fixed for the run: a worker that leaves does not make the others' pushes count more.
- `staleness_lr`: a push of k mini-batches that is s mini-batches stale moves k / (k + s) as far.

The step is out of place and checked. The server's current parameters are an immutable vector
that fetches send without copying: an update never writes into it. `step` computes the result
into a spare vector (the previous version's, once no fetch sends it: `in_use`), checks it, and
only then returns it; a result (or optimizer state) with NaN/Inf raises Refused with the one-line
reason (a non-finite gradient, or an update that overflowed: two huge but finite pushes) and the
parameters and the optimizer's state stay bit-identical.

Cost per update, SGD (the default server, `--momentum-at worker`: w_new = w - push): two passes
over three vectors (multiply, add) and one read pass to check, no copy, no temporary. With
server momentum the velocity is updated into a second spare vector and swapped the same way.
"""

import numpy as np

from ..backends import numpy_backend
from ..optim import SGD, Adagrad
from .protocol import Refused


def all_finite(x):
    """True if no element of the float32 vector x is NaN or Inf.

    One read pass and no temporary: x.x is NaN or Inf whenever an element is. A sum of huge
    finite values can overflow to Inf as well; only then is each element checked (exactly)."""
    return bool(np.isfinite(np.dot(x, x))) or bool(np.isfinite(x).all())


def count_not_finite(x):
    return int(np.count_nonzero(~np.isfinite(x)))


def frozen(vector):
    """`vector`, made read-only: a parameter vector fetches may send."""
    vector.flags.writeable = False
    return vector


class UpdateRule:
    """The server's optimizer (SGD or Adagrad), the scale of a push, and the checked step."""

    def __init__(self, num_params, *, optimizer="sgd", momentum=0.0, staleness_lr=False, lr_scale=1.0,
                 push_fraction=1.0):
        if optimizer not in ("sgd", "adagrad"):
            raise ValueError(f"unknown server optimizer {optimizer!r}; choose sgd or adagrad")
        self.name, self.num_params = optimizer, num_params
        # Weight decay is already in the pushes, so the server adds none. `momentum` is per
        # mini-batch: a push of k mini-batches decays the velocity by momentum**k.
        self.momentum, self.staleness_lr, self.lr_scale = momentum, staleness_lr, lr_scale
        if not 0.0 < push_fraction <= 1.0:
            raise ValueError(f"the push fraction must be in (0, 1], got {push_fraction}")
        self.push_fraction = push_fraction
        if optimizer == "sgd":
            if not 0.0 <= momentum < 1.0:
                raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
            self.optimizer = SGD(numpy_backend, num_params, momentum=momentum, weight_decay=0.0)
        else:
            self.optimizer = Adagrad(num_params)
        self.spare = None  # a vector the next step may write (an older version nobody sends)
        self.spare_velocity = None  # SGD with momentum: the velocity's next vector

    def scale(self, batches, staleness, lr_now):
        """What a push of `batches` mini-batches, `staleness` mini-batches stale, is multiplied by
        before it is subtracted; `lr_now()`: the run's schedule at the server's step count (only
        Adagrad asks: an SGD push is a displacement, never scaled by the lr now)."""
        if self.name == "adagrad":
            scale = lr_now() * self.lr_scale
        elif self.momentum and batches > 1:
            scale = self.push_fraction * (1.0 - self.momentum**batches) / (1.0 - self.momentum)
        else:
            scale = self.push_fraction
        if self.staleness_lr:
            scale *= batches / (batches + staleness)
        return scale

    def step(self, params, grad, scale, batches, in_use=lambda vector: False):
        """The parameters after one step with `grad` at `scale` for a push of `batches`, as a new
        read-only vector; `params` is only read. Refused, changing nothing, if not finite.

        `in_use(vector)`: True while a fetch still sends that vector (it may not be written)."""
        out = self.spare
        if out is None or in_use(out):
            out = np.empty(self.num_params, np.float32)
        out.flags.writeable = True
        if self.name == "sgd":  # per mini-batch: m**k for a push of k
            error = self._sgd_into(params, grad, np.float32(scale), out, self.momentum**batches)
        else:
            error = self._generic_into(params, grad, scale, out)
        if error:
            self.spare = out
            raise Refused(error)
        self.spare = params
        return frozen(out)

    def _sgd_into(self, params, grad, lr, out, m):
        """SGD: v_new = m v + g (skipped for m = 0), out = params - lr v_new; v swapped on success."""
        v = self.optimizer.velocity
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
        """The optimizer's state as float32 copies (the checkpoint's)."""
        return {k: np.array(v, dtype=np.float32, copy=True) for k, v in self.optimizer.state().items()}

    def load_state(self, state):
        """ValueError, changing nothing, if a vector is missing or of the wrong size."""
        self.optimizer.load_state(state)

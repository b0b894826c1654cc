"""Optimizers over the flat parameter vector, and the learning-rate schedule.

`SGD` runs on any backend (its update is one backend op, a CUDA kernel on the
GPU). `Adagrad` is the per-parameter adaptive rule DistBelief's Downpour SGD
used on its parameter server; it runs in NumPy on the server.
"""

import math
from dataclasses import dataclass

import numpy as np


class SGD:
    """SGD with momentum and weight decay: v = m*v + g + wd*w;  w -= lr*v."""

    def __init__(self, be, num_params, momentum=0.9, weight_decay=0.0):
        self.be, self.momentum, self.weight_decay = be, momentum, weight_decay
        self.velocity = be.zeros(num_params)

    def step(self, params, grads, lr):
        self.be.sgd_update(params, grads, self.velocity, lr, self.momentum, self.weight_decay)

    def state(self):
        return {"velocity": np.asarray(self.be.to_numpy(self.velocity))}

    def load_state(self, state):
        """Restore what `state()` returned (a resumed run continues with the same velocity)."""
        self.velocity = self.be.asarray(_vector(state, "velocity", self.velocity.size))


class Adagrad:
    """Adagrad (Duchi et al. 2011): each parameter's step shrinks with its summed squared gradients."""

    def __init__(self, num_params, eps=1e-8, weight_decay=0.0):
        """Host-side (NumPy) only: the parameter server's optimizer, never a worker's."""
        self.eps, self.weight_decay = np.float32(eps), weight_decay
        self.sum_sq = np.zeros(num_params, dtype=np.float32)

    def step(self, params, grads, lr):
        g = grads + np.float32(self.weight_decay) * params if self.weight_decay else grads
        self.sum_sq += g * g
        params -= np.float32(lr) * g / (np.sqrt(self.sum_sq) + self.eps)

    def state(self):
        return {"sum_sq": self.sum_sq.copy()}

    def load_state(self, state):
        """Restore what `state()` returned."""
        self.sum_sq = _vector(state, "sum_sq", self.sum_sq.size).copy()


def _vector(state, key, size):
    """state[key] as float32[size]; ValueError (one line) if it is missing or has another shape."""
    if key not in state:
        raise ValueError(f"optimizer state has no {key!r} (it has {sorted(state)})")
    v = np.asarray(state[key])
    if v.shape != (size,) or v.dtype.kind != "f":
        raise ValueError(f"optimizer state {key!r} is {v.dtype}{list(v.shape)}, expected float32[{size}]")
    return np.ascontiguousarray(v, dtype=np.float32)


def learning_rate(step, total_steps, base_lr, warmup_steps=0):
    """Linear warm-up, then cosine decay from base_lr to 0 at total_steps."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """`learning_rate` for one run: the lr at any step count, `schedule(step)`.

    The parameter server sends its workers the run's schedule (`as_dict`); each worker steps at
    `schedule(server's step count + its own mini-batches since)`, so every local step follows the
    same warm-up and cosine that single-process training follows."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0

    def __call__(self, step):
        return learning_rate(step, self.total_steps, self.base_lr, self.warmup_steps)

    def as_dict(self):
        return {"base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps}

    @classmethod
    def from_dict(cls, d):
        """The schedule a server sent; ValueError (one line) if any field is missing or not sane."""
        try:
            base_lr, total, warmup = d["base_lr"], d["total_steps"], d["warmup_steps"]
        except (TypeError, KeyError) as e:
            raise ValueError(f"bad lr schedule {str(d)[:80]!r}: missing {e}") from None
        if (isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not math.isfinite(base_lr)
                or base_lr < 0 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                          for n in (total, warmup))):
            raise ValueError(f"bad lr schedule {str(d)[:80]!r}")
        return cls(float(base_lr), total, warmup)

"""The parameter server's checkpoints: writing its whole state, and checking one before a resume.

    saver = Checkpointer(path, every=60.0)
    saver.due()                                       # `every` seconds since the last one?
    saver.write(model_name, fingerprint, full_state, cond, log)   # path, or None (and why in .error)
    params, meta, histogram = check_checkpoint(ckpt, fingerprint, "sgd", num_params)  # or ValueError

The checkpoint holds the whole state (parameters, optimizer state, version, steps, counters,
staleness histogram; docs/checkpoint.md), so `ParameterServer.resume` continues a run where it
was saved, after `check_checkpoint` has checked every field (`check_meta`, finite vectors of the
right shapes): a bad file is one line and the server stays as it was. A checkpoint that cannot be
written (a full or read-only disk) leaves the previous one as it was, is reported (`error`,
counted in `failures`) and retried at the next interval.
"""

import threading
import time

import numpy as np

from .. import checkpoint
from .protocol import clip
from .staleness import EXACT_STALENESS, StalenessHistogram
from .update import all_finite, count_not_finite

MAX_INT = 2**53  # integers and floats in meta stay below this (exact in a float64)
CHECKPOINT_FORMAT = 2  # meta["format"] of a full-state checkpoint (docs/checkpoint.md)
RESUMED_COUNTERS = ("pushes", "fetches", "rejected", "discarded", "checkpoints")  # optional in meta, 0 if absent


def check_meta(meta, optimizer):
    """A format-2 checkpoint's `meta` (docs/checkpoint.md), checked field by field; returns a clean
    copy (every number an int or a finite float in range). ValueError (one line) on anything else:
    a wrong type, a negative or huge version (no frame header could carry it), a histogram that is
    not {"staleness": count} or has too many keys."""
    def fail(what):
        raise ValueError(f"cannot resume: the checkpoint's meta {what}")

    def count(key, default=None):
        value = meta.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
            fail(f"{key!r} must be an integer from 0 to 2**53, got {clip(value, 40)}")
        return value

    if not isinstance(meta, dict):
        fail(f"must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("cannot resume: the checkpoint holds only parameters (use --init for a warm start)")
    if meta.get("optimizer") != optimizer:
        raise ValueError(f"cannot resume: the checkpoint's server optimizer is {clip(meta.get('optimizer'), 40)}, "
                         f"this run's is {optimizer}")
    clean = dict(meta, version=count("version"), steps=count("steps"))
    for key in RESUMED_COUNTERS:
        clean[key] = count(key, 0)
    seconds = meta.get("train_seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_INT:
        fail(f"'train_seconds' must be a number from 0 to 2**53, got {clip(seconds, 40)}")
    clean["train_seconds"] = float(seconds)
    histogram = meta.get("staleness", {})
    if not isinstance(histogram, dict) or len(histogram) > 4 * EXACT_STALENESS:
        fail("'staleness' must be an object of at most a few hundred {\"staleness\": pushes}")
    for key, value in histogram.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 16):
            fail(f"'staleness' has a key {clip(key, 20)!r} that is not a staleness")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
            fail(f"'staleness' counts must be integers from 0 to 2**53, got {clip(value, 40)}")
    clean["staleness"] = dict(histogram)
    return clean


def check_checkpoint(ckpt, fingerprint, optimizer, num_params):
    """(params as a float32 copy, clean meta, StalenessHistogram) of a full-state checkpoint
    (`minasgd.checkpoint.load`'s dict) of this model and optimizer; ValueError (one line) if it is
    not one. The optimizer state's vectors are checked here too (finite, the right shape, Adagrad's
    sums not negative); that none is missing, `load_state` checks."""
    if ckpt["fingerprint"] != fingerprint:
        raise ValueError(f"cannot resume: the checkpoint is for {clip(ckpt['fingerprint'], 100)}, not {fingerprint}")
    meta = check_meta(ckpt["meta"], optimizer)
    params = np.asarray(ckpt["params"])
    if params.shape != (num_params,):
        raise ValueError(f"cannot resume: {params.size} parameters, the model has {num_params}")
    if not all_finite(np.ascontiguousarray(params, dtype=np.float32)):
        raise ValueError(f"cannot resume: the parameters hold {count_not_finite(params)} NaN/Inf values")
    for name, vector in ckpt["state"].items():
        vector = np.asarray(vector, dtype=np.float32)
        if vector.shape != (num_params,) or not all_finite(vector) or (name == "sum_sq" and (vector < 0).any()):
            raise ValueError(f"cannot resume: optimizer state {clip(name, 40)!r} is not a finite "
                             f"float32[{num_params}] of the right sign")
    return np.array(params, dtype=np.float32, copy=True), meta, StalenessHistogram.from_json(meta["staleness"])


class Checkpointer:
    """Writes the server's full state every `every` seconds (0: only when asked), one writer at a
    time (`lock`, never held with the server's lock), and remembers how that went."""

    def __init__(self, path=None, every=60.0):
        self.path, self.every = path, every
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.count = self.failures = 0
        self.error = None  # the last failure's one-line reason, until a checkpoint succeeds

    def due(self):
        return bool(self.every) and time.monotonic() - self.last >= self.every

    def write(self, model_name, fingerprint, full_state, cond, log):
        """Save `full_state()` = (params, optimizer state, meta) atomically; returns the path, or
        None if there is no path or writing failed (then `error` says why, once in `log`).
        `cond`: the server's lock, held only to count (the copy is `full_state`'s business)."""
        if self.path is None:
            return None
        with self.lock:
            self.last = time.monotonic()
            params, state, meta = full_state()
            try:
                path = checkpoint.save(self.path, model_name, fingerprint, params, meta, state)
            except OSError as e:
                with cond:
                    self.failures += 1
                    self.error = f"checkpoint failed: {e.strerror or e}; training goes on, keeping the last good one"
                    log(self.error)
                return None
            with cond:
                self.count += 1
                self.error = None
            return path

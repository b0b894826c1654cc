"""The parameter server's state and rules, with no networking in sight.

    ps = ParameterServer(params, model_name="tiny", fingerprint=model.fingerprint(), total_steps=2000)
    wid = ps.join(fingerprint, {"name": "host:1234"})     # Refused if the model differs
    version, done = ps.fetch_into(wid, buffer)              # a consistent copy of the parameters
    reply = ps.push(wid, grad_sum, base_version, batches=4)   # {"version", "lr", "done"}
    ps.leave(wid, "connection reset")

A transport (`minasgd.ps.tcp` over sockets, `minasgd.ps.mpi` over MPI) turns each worker's messages into
these calls, one thread per worker. One lock (a Condition) guards all the state below, so any
number of threads may call in at once.

The rules:
- Training starts when `expected_workers` have joined: until then FETCH waits.
- `version` counts the updates applied; `steps` counts the mini-batches behind them. The
  learning rate follows single-process training's warm-up + cosine schedule over `steps`, and
  training is over when `steps` reaches `total_steps`.
- A push is the SUM of a worker's gradients over `batches` mini-batches, weight decay included
  (see `minasgd.ps.worker`). The server applies it with its own optimizer: SGD with momentum
  (default) or Adagrad, as Downpour SGD did. So a push of k mini-batches moves the parameters
  about as far as k single-process steps would.
- Async (the paper): each push is applied the moment it arrives. Its staleness is the server
  version now minus the version the worker fetched; `staleness_lr` divides the step by it.
- Sync (the bulk-synchronous baseline): a push waits until every live worker has pushed once
  in this round; the mean of the round's pushes is applied as ONE update, then all are released.
- Everything about a push is checked BEFORE the parameters are touched: a wrong size, a
  non-finite value, a version from the future or an unknown worker raise `Refused`, and the
  parameters stay bit-identical.
"""

import collections
import threading
import time

import numpy as np

from .. import checkpoint
from ..backends import numpy_backend
from ..optim import SGD, Adagrad, learning_rate


class Refused(Exception):
    """A request the server will not serve; the one-line message goes back to the worker."""


class WorkerState:
    """What the server knows about one worker (reported numbers come from its STATS messages)."""

    def __init__(self, worker_id, name):
        self.id, self.name = worker_id, name
        self.joined = time.time()
        self.left = None  # None while connected, else why it left
        self.fetches = self.pushes = 0
        self.last_staleness = 0
        self.report = {}  # the worker's own numbers: loss, images, images_per_second, ...

    def as_dict(self):
        return {"id": self.id, "name": self.name, "alive": self.left is None, "left": self.left,
                "fetches": self.fetches, "pushes": self.pushes, "last_staleness": self.last_staleness,
                **self.report}


class ParameterServer:
    def __init__(self, params, *, model_name, fingerprint, total_steps, lr=0.02, warmup_steps=0,
                 optimizer="sgd", momentum=0.9, sync=False, staleness_lr=False, expected_workers=1,
                 worker_config=None, checkpoint_path=None, checkpoint_every=60.0):
        if optimizer not in ("sgd", "adagrad"):
            raise ValueError(f"unknown server optimizer {optimizer!r}; choose sgd or adagrad")
        self.params = np.array(params, dtype=np.float32, copy=True)
        self.num_params = self.params.size
        self.model_name, self.fingerprint = model_name, fingerprint
        self.total_steps, self.base_lr, self.warmup_steps = total_steps, lr, warmup_steps
        self.sync, self.staleness_lr = sync, staleness_lr
        self.optimizer_name = optimizer
        # Weight decay is already in the pushed gradients, so the server adds none.
        if optimizer == "sgd":
            self.optimizer = SGD(numpy_backend, self.num_params, momentum=momentum, weight_decay=0.0)
        else:
            self.optimizer = Adagrad(numpy_backend, self.num_params)
        self.worker_config = dict(worker_config or {})

        self.cond = threading.Condition()
        self.version = self.steps = 0
        self.pushes = self.fetches = self.rejected = self.discarded = 0
        self.staleness = collections.Counter()  # staleness -> number of pushes
        self.workers = {}  # id -> WorkerState, including those that left
        self.events = collections.deque(maxlen=100)  # (time, text): joins, leaves, rejections
        self.stopped = False
        self.started = time.time()
        # Nobody gets parameters before `expected_workers` have joined, so they all start together.
        self.expected_workers = expected_workers
        self.ready = threading.Event()
        self.ready_time = None  # time.perf_counter() when training started

        # Sync mode: the round being gathered.
        self.round_sum = np.zeros(self.num_params, dtype=np.float32) if sync else None
        self.round_members, self.round_batches = set(), 0

        self.checkpoint_path, self.checkpoint_every = checkpoint_path, checkpoint_every
        self.checkpoint_lock = threading.Lock()  # one writer at a time; never held with `cond`
        self.last_checkpoint = time.monotonic()
        self.checkpoints = 0

    # ------------------------------------------------------------------ small helpers

    @property
    def done(self):
        return self.stopped or self.steps >= self.total_steps

    @property
    def mode(self):
        return "sync" if self.sync else "async"

    def lr(self):
        return learning_rate(self.steps, self.total_steps, self.base_lr, self.warmup_steps)

    def live_ids(self):
        return {wid for wid, w in self.workers.items() if w.left is None}

    def log(self, text):
        self.events.append((time.time(), text))

    def recent_events(self, n):
        with self.cond:
            return list(self.events)[-n:]

    def reject(self, who, reason):
        """Count and log a rejected request (the transport calls this for malformed frames too)."""
        with self.cond:
            self.rejected += 1
            self.log(f"rejected {who}: {reason}")

    # ------------------------------------------------------------------ workers come and go

    def join(self, fingerprint, info):
        """Admit a worker whose model matches ours; returns its id. Refused otherwise."""
        if fingerprint != self.fingerprint:
            raise Refused(f"model mismatch: the worker has {fingerprint}, the server has {self.fingerprint}")
        with self.cond:
            if self.done:
                raise Refused("training is already finished")
            wid = len(self.workers) + 1
            self.workers[wid] = WorkerState(wid, str(info.get("name", f"worker {wid}")))
            self.log(f"worker {wid} ({self.workers[wid].name}) joined")
            if len(self.live_ids()) >= self.expected_workers:
                self.begin()
            return wid

    def begin(self):
        """Let training start (normally when the expected workers have joined)."""
        if not self.ready.is_set():
            self.ready_time = time.perf_counter()
            self.ready.set()

    def welcome(self, worker_id):
        """What a worker needs to know to start: its id, the current lr and the run's settings."""
        with self.cond:
            return {"worker_id": worker_id, "lr": self.lr(), "mode": self.mode, **self.worker_config}

    def leave(self, worker_id, reason):
        """A worker is gone (said BYE, hung up, timed out). Training goes on with the others."""
        with self.cond:
            worker = self.workers.get(worker_id)
            if worker is None or worker.left is not None:
                return
            worker.left = reason
            self.log(f"worker {worker_id} left: {reason}")
            if self.sync:
                self._maybe_finish_round()  # the round may have been waiting for this worker only
            self.cond.notify_all()

    def report(self, worker_id, numbers):
        """Store a worker's own statistics (loss, images/s...) for the dashboard and the run."""
        with self.cond:
            if worker_id in self.workers:
                self.workers[worker_id].report = {k: v for k, v in numbers.items()
                                                  if isinstance(v, (int, float)) and not isinstance(v, bool)}

    # ------------------------------------------------------------------ fetch and push

    def fetch_into(self, worker_id, out):
        """Copy the parameters into `out` (float32[num_params]); returns (version, done).

        The copy, made under the lock, is a consistent snapshot: a slow network never holds the lock.
        """
        self.ready.wait()
        with self.cond:
            np.copyto(out, self.params)
            self.fetches += 1
            if worker_id in self.workers:
                self.workers[worker_id].fetches += 1
            return self.version, self.done

    def fetch_snapshot(self, worker_id):
        """(params, version, done) where params is a read-only snapshot of the current version.

        Every fetch of the same version shares one snapshot: it is copied once, the first time a
        version is fetched, and swapped for a new one after an update; the old array stays valid
        for whoever is still sending it (nothing ever writes to it). A fetch therefore costs no
        copy at all while the parameters do not change, and the lock is never held while sending.
        """
        self.ready.wait()
        with self.cond:
            snap = getattr(self, "_fetch_snapshot", None)
            if snap is None or snap[1] != self.version:
                params = self.params.copy()
                params.flags.writeable = False
                snap = self._fetch_snapshot = (params, self.version)
            self.fetches += 1
            if worker_id in self.workers:
                self.workers[worker_id].fetches += 1
            return snap[0], snap[1], self.done

    def push(self, worker_id, grad, base_version, batches=1):
        """Apply (async) or gather (sync) one pushed gradient sum; returns {"version", "lr", "done"}.

        Raises Refused, with the parameters untouched, if anything about the push is wrong.
        """
        grad = np.asarray(grad)
        if grad.dtype != np.float32 or grad.shape != (self.num_params,):
            raise Refused(f"gradient must be float32[{self.num_params}], got {grad.dtype}{list(grad.shape)}")
        if batches < 1:
            raise Refused(f"a push must sum at least one mini-batch, got {batches}")
        if not np.isfinite(grad).all():
            raise Refused(f"gradient has {np.count_nonzero(~np.isfinite(grad))} NaN/Inf values")
        with self.cond:
            worker = self.workers.get(worker_id)
            if worker is None or worker.left is not None:
                raise Refused(f"worker {worker_id} is not connected")
            if base_version > self.version:
                raise Refused(f"gradient claims server version {base_version}, but the server is at {self.version}")
            if self.done:
                self.discarded += 1
                return self._reply()
            # BEGIN SOLUTION task 6.1: staleness = server version now - base_version; count it in self.staleness (a Counter), worker.pushes, worker.last_staleness and self.pushes; in async mode (not self.sync) apply it at once with self._apply(grad, lr, batches), lr = self.lr(), divided by max(1, staleness) if self.staleness_lr, and return self._reply()
            staleness = self.version - base_version
            self.staleness[staleness] += 1
            worker.pushes += 1
            worker.last_staleness = staleness
            self.pushes += 1
            if not self.sync:
                lr = self.lr() / max(1, staleness) if self.staleness_lr else self.lr()
                self._apply(grad, lr, batches)
                return self._reply()
            # END SOLUTION
            # Sync: add to this round, then wait until the round has been applied.
            self.round_sum += grad
            self.round_members.add(worker_id)
            self.round_batches += batches
            my_round = self.version
            self._maybe_finish_round()
            while self.version == my_round and not self.stopped:
                self.cond.wait(timeout=1.0)
            return self._reply()

    def _apply(self, grad, lr, batches):
        """One optimizer update (the caller holds the lock)."""
        # BEGIN SOLUTION task 6.1: one optimizer step of self.params with grad at this lr (self.optimizer.step), then count it: version + 1, steps + batches (mini-batches in the push)
        self.optimizer.step(self.params, grad, lr)
        self.version += 1
        self.steps += batches
        # END SOLUTION

    def _maybe_finish_round(self):
        """Sync mode: once every live worker has pushed, apply the round's mean (caller holds the lock)."""
        if not self.round_members or not self.live_ids() <= self.round_members:
            return
        self.round_sum /= np.float32(len(self.round_members))
        self._apply(self.round_sum, self.lr(), self.round_batches)
        self.round_sum[...] = 0
        self.round_members, self.round_batches = set(), 0
        self.cond.notify_all()

    def _reply(self):
        return {"version": self.version, "lr": self.lr(), "done": self.done}

    # ------------------------------------------------------------------ checkpoints and shutdown

    def snapshot(self):
        """(params copy, version, steps), consistent."""
        with self.cond:
            return self.params.copy(), self.version, self.steps

    def checkpoint(self):
        """Write the parameters to checkpoint_path atomically (the lock is held only for the copy)."""
        if self.checkpoint_path is None:
            return None
        with self.checkpoint_lock:
            params, version, steps = self.snapshot()
            meta = {"version": version, "steps": steps, "pushes": self.pushes, "mode": self.mode}
            path = checkpoint.save(self.checkpoint_path, self.model_name, self.fingerprint, params, meta)
            self.last_checkpoint = time.monotonic()
            self.checkpoints += 1
            return path

    def maybe_checkpoint(self):
        """Checkpoint if `checkpoint_every` seconds have passed since the last one."""
        if self.checkpoint_every and time.monotonic() - self.last_checkpoint >= self.checkpoint_every:
            return self.checkpoint()
        return None

    def stop(self):
        """End training now: waiting pushes are released and every later request hears 'done'."""
        with self.cond:
            self.stopped = True
            self.begin()  # nobody waits for workers that will not come
            self.cond.notify_all()

    # ------------------------------------------------------------------ statistics

    def stats(self):
        """Everything worth showing or keeping, as plain JSON-able values."""
        with self.cond:
            return {
                "mode": self.mode, "optimizer": self.optimizer_name, "version": self.version,
                "steps": self.steps, "total_steps": self.total_steps, "lr": self.lr(), "done": self.done,
                "pushes": self.pushes, "fetches": self.fetches, "rejected": self.rejected,
                "discarded": self.discarded, "checkpoints": self.checkpoints,
                "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
                "workers": [w.as_dict() for w in self.workers.values()],
                "seconds": time.time() - self.started,
            }

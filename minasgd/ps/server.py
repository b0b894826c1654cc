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
- Where the momentum lives (`--momentum-at`), with one meaning of --lr and --momentum m either
  way: every mini-batch's gradient moves the parameters lr / (1 - m) in total, spread over the
  following mini-batches exactly as in single-process training.
  - worker: each worker runs the trainer's SGD with momentum locally and pushes the SUM of the
    steps it took, divided by its lr (its "velocities", weight decay included; see
    `minasgd.ps.worker`). The server subtracts lr * push: with one worker it follows
    single-process training's path exactly, whatever nsync is.
  - server: workers push plain gradient sums; the server keeps ONE velocity for everyone, which
    decays by m per mini-batch (m**k for a push of k): v = m**k v + push, w -= lr_k v, with
    lr_k = lr (1 - m**k) / (1 - m). With nsync 1 that is single-process momentum SGD, fed by
    several workers.
  Extra scalings on top: `lr_scale` (e.g. 1/N for N workers), and Adagrad, as Downpour SGD had
  on its server (then pushes are plain gradient sums and lr is Adagrad's).
- Staleness is counted in mini-batches: the server's step count now minus its step count when
  the worker fetched the parameters it computed from. With `staleness_lr` a push of k
  mini-batches that is s mini-batches stale moves k / (k + s) as far (1 with one worker; about
  1/N with N workers that push in turn).
- Async (the paper): each push is applied the moment it arrives.
- Sync (the bulk-synchronous baseline): a push waits until every live worker has pushed once
  in this round; the SUM of the round's pushes is applied as ONE update (per image, the same
  step as async), then all are released.
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


STEPS_MEMORY = 100_000  # versions whose step count is kept for staleness (a worker older is capped)


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
                 optimizer="sgd", momentum=0.0, lr_scale=1.0, sync=False, staleness_lr=False,
                 expected_workers=1, worker_config=None, checkpoint_path=None, checkpoint_every=60.0,
                 eval_every_steps=None):
        if optimizer not in ("sgd", "adagrad"):
            raise ValueError(f"unknown server optimizer {optimizer!r}; choose sgd or adagrad")
        self.params = np.array(params, dtype=np.float32, copy=True)
        self.num_params = self.params.size
        self.model_name, self.fingerprint = model_name, fingerprint
        self.total_steps, self.base_lr, self.warmup_steps = total_steps, lr, warmup_steps
        self.sync, self.staleness_lr, self.lr_scale = sync, staleness_lr, lr_scale
        self.optimizer_name = optimizer
        # Weight decay is already in the pushes, so the server adds none. `momentum` is per
        # mini-batch: a push of k mini-batches decays the velocity by momentum**k.
        self.momentum = momentum
        if optimizer == "sgd":
            if not 0.0 <= momentum < 1.0:
                raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
            self.optimizer = SGD(numpy_backend, self.num_params, momentum=momentum, weight_decay=0.0)
        else:
            self.optimizer = Adagrad(numpy_backend, self.num_params)
        self.worker_config = dict(worker_config or {})

        self.cond = threading.Condition()
        self.version = self.steps = 0
        self.pushes = self.fetches = self.rejected = self.discarded = 0
        self.staleness = collections.Counter()  # staleness in mini-batches -> number of pushes
        self.steps_at_version = {0: 0}  # version -> steps then (the last STEPS_MEMORY versions)
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

        # Test evaluations at exact step counts: when an update crosses a multiple of
        # eval_every_steps, a copy of the parameters waits here for the monitor.
        self.eval_every_steps = eval_every_steps
        self.next_eval_step = eval_every_steps
        self.eval_snapshots = collections.deque()  # (params copy, version, steps)

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
        """The run's learning rate now: single-process training's schedule at the server's step count."""
        return learning_rate(self.steps, self.total_steps, self.base_lr, self.warmup_steps)

    def staleness_of(self, base_version):
        """Mini-batches applied since the worker fetched version `base_version`."""
        steps_then = self.steps_at_version.get(base_version)
        if steps_then is None:  # older than we remember: count from the oldest version kept
            steps_then = self.steps_at_version[max(0, self.version - STEPS_MEMORY + 1)]
        return self.steps - steps_then

    def step_lr(self, batches, staleness):
        """The lr this update is applied with (the caller holds the lock)."""
        lr = self.lr() * self.lr_scale
        if self.optimizer_name == "sgd" and self.momentum and batches > 1:
            # velocity decays m**k per push of k: lr_k = lr (1 - m**k) / (1 - m) keeps a gradient's total
            lr *= (1.0 - self.momentum**batches) / (1.0 - self.momentum)
        if self.staleness_lr:
            lr *= batches / (batches + staleness)
        return lr

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
            return {"worker_id": worker_id, "lr": self.lr() * self.lr_scale, "mode": self.mode, **self.worker_config}

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
            # BEGIN SOLUTION task 6.1: staleness = mini-batches applied since the worker fetched (self.staleness_of(base_version)); count it in self.staleness (a Counter), worker.pushes, worker.last_staleness and self.pushes; in async mode (not self.sync) apply it at once with self._apply(grad, self.step_lr(batches, staleness), batches) and return self._reply()
            staleness = self.staleness_of(base_version)
            self.staleness[staleness] += 1
            worker.pushes += 1
            worker.last_staleness = staleness
            self.pushes += 1
            if not self.sync:
                self._apply(grad, self.step_lr(batches, staleness), batches)
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
        if self.optimizer_name == "sgd":
            self.optimizer.momentum = self.momentum**batches  # per mini-batch, m**k for a push of k
        self.optimizer.step(self.params, grad, lr)
        self.version += 1
        self.steps += batches
        # END SOLUTION
        self.steps_at_version[self.version] = self.steps
        self.steps_at_version.pop(self.version - STEPS_MEMORY, None)
        if self.eval_every_steps and self.steps >= self.next_eval_step:
            self.eval_snapshots.append((self.params.copy(), self.version, self.steps))
            self.next_eval_step = (self.steps // self.eval_every_steps + 1) * self.eval_every_steps

    def _maybe_finish_round(self):
        """Sync mode: once every live worker has pushed, apply the round's sum (caller holds the lock)."""
        if not self.round_members or not self.live_ids() <= self.round_members:
            return
        self._apply(self.round_sum, self.step_lr(self.round_batches, 0), self.round_batches)
        self.round_sum[...] = 0
        self.round_members, self.round_batches = set(), 0
        self.cond.notify_all()

    def _reply(self):
        # The lr a worker uses for its local steps until its next push.
        return {"version": self.version, "lr": self.lr() * self.lr_scale, "done": self.done}

    # ------------------------------------------------------------------ checkpoints and shutdown

    def take_eval_snapshot(self):
        """The oldest waiting (params, version, steps) to evaluate, or None."""
        with self.cond:
            return self.eval_snapshots.popleft() if self.eval_snapshots else None

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

"""The parameter server's state and rules, with no networking in sight.

    ps = ParameterServer(params, model_name="tiny", fingerprint=model.fingerprint(), total_steps=2000)
    wid = ps.join(fingerprint, {"name": "host:1234"})     # Refused if the model differs
    version, done = ps.fetch_into(wid, buffer)              # a consistent copy of the parameters
    with ps.fetch_snapshot(wid) as (params, version, done): ...   # the same, shared: no copy
    reply = ps.push(wid, step_sum, base_version, batches=4)   # {"version", "steps", "lr", "done"}
    ps.leave(wid, "connection reset")

A transport (`minasgd.ps.tcp` over sockets, `minasgd.ps.mpi` over MPI) turns each worker's messages into
these calls, one thread per worker. One lock (a Condition) guards all the state below, so any
number of threads may call in at once.

The rules:
- Training starts when `expected_workers` have joined: until then FETCH waits.
- `version` counts the updates applied; `steps` counts the mini-batches behind them. The
  learning rate follows single-process training's warm-up + cosine schedule over `steps`
  (`minasgd.optim.Schedule`), and training is over when `steps` reaches `total_steps`.
- A push is what the worker MOVED, applied as it is. Each worker runs the trainer's SGD locally,
  at the schedule's lr for its own position in the run (the server's step count in its last
  reply + its mini-batches since), and pushes the sum of the steps it took, lr_t * v_t summed
  (its displacement, weight decay included; see `minasgd.ps.worker`). The server subtracts that
  sum with an explicit scale, `push_scale`: 1, times k / (k + s) with `staleness_lr`, times
  (1 - m**k) / (1 - m) with the server's momentum. It never multiplies a push by its own lr
  *now*: the schedule may have moved since the worker stepped (warm-up, other workers' pushes),
  and the parameters would move by another amount than the worker computed. With one worker the
  server follows single-process training's path exactly (bit for bit at nsync 1).
- Where the momentum lives (`--momentum-at`), with one meaning of --lr and --momentum m either
  way: every mini-batch's gradient moves the parameters lr / (1 - m) in total, spread over the
  following mini-batches exactly as in single-process training.
  - worker: each worker's local SGD has momentum. With N workers the launcher sets each
    worker's momentum and lr (`minasgd.ps.run.worker_settings`).
  - server: the workers' local SGD has no momentum; the server keeps ONE velocity of pushed
    displacements for everyone, which decays by m per mini-batch (m**k for a push of k):
    v = m**k v + push, w -= (1 - m**k) / (1 - m) v. With nsync 1 that is single-process
    momentum SGD, fed by several workers.
  - Adagrad (as Downpour SGD had on its server): the workers take no local steps and push plain
    gradient sums, which the server's Adagrad applies at the schedule's lr now.
- Staleness is counted in mini-batches: the server's step count now minus its step count when
  the worker fetched the parameters it computed from. With `staleness_lr` a push of k
  mini-batches that is s mini-batches stale moves k / (k + s) as far (1 with one worker; about
  1/N with N workers that push in turn). A base version older than the server remembers (before
  a resume, or STEPS_MEMORY versions back) counts from the oldest it does; the histogram counts
  staleness exactly below EXACT_STALENESS and in power-of-two buckets above (`staleness_bucket`).
- Async (the paper): each push is applied the moment it arrives.
- Sync (the bulk-synchronous baseline): a push waits until every live worker has pushed once
  in this round; the SUM of the round's pushes is applied as ONE update (per image, the same
  step as async), then all are released.
- Everything about a push is checked BEFORE the parameters change: a wrong size, a non-finite
  value, a version from the future, more mini-batches than the worker's npush or an unknown
  worker raise `Refused`, and the parameters stay bit-identical. The update is computed into a
  spare vector (`minasgd.ps.update`) and swapped in only if its result is finite, so a NaN/Inf
  push, or two huge but finite pushes whose sum overflows, is refused the same way.
- The current parameters are one read-only vector that every fetch of that version sends as it
  is (no copy, no lock held while sending); an update never writes into a vector being sent.
- Sync rounds have a deadline (`round_timeout`): a live worker that has not pushed by then is
  dropped from the round, which is applied without it, and from every later round (counted in
  its `missed_rounds`; its pushes still count) until it has pushed in 2 rounds in a row, 4 after
  a second miss, 8 after a third...: one silent or flaky peer cannot stall the run.
- A push sums at most the run's npush mini-batches (`max_npush`: the run's --npush, else
  --nsync), whatever the worker declares, so no peer spends the run's steps faster than sized.
- No peer can grow the server's memory without bound: names are cut to MAX_NAME characters,
  STATS must match STATS_FIELDS, and only the last MAX_DEPARTED workers that left are kept.
  Every peer string (names, reasons) is made safe (`protocol.clip`) before it is kept or logged.
- `stop(interrupted=True)` (a signal, an error): every request then hears STOPPING ("server
  stopping"), never "training finished", so the workers reconnect to the resumed server.
- The checkpoint holds the whole state (parameters, optimizer state, version, steps, counters,
  staleness histogram; docs/checkpoint.md): `resume()` continues a run where it was saved,
  after checking every field (`check_meta`, finite vectors). A checkpoint that cannot be
  written is reported and retried at the next interval.
"""

import collections
import contextlib
import json
import math
import threading
import time

import numpy as np

from .. import checkpoint
from ..backends import numpy_backend
from ..optim import SGD, Adagrad, Schedule
from .protocol import clip
from .update import CheckedUpdate, all_finite, count_not_finite


STEPS_MEMORY = 100_000  # versions whose step count is kept for staleness (a worker older is capped)
EXACT_STALENESS = 128  # staleness values the histogram counts one by one; above, power-of-two buckets


class Refused(Exception):
    """A request the server will not serve; the one-line message goes back to the worker."""


class Stopping(Refused):
    """The server is stopping before training is over (a signal, an error): the worker should
    reconnect to the server that resumes the run, not believe training is done."""


MAX_NAME = 64  # characters of a worker's name that are kept
MAX_DEPARTED = 32  # workers that left and are still listed; older ones are only counted
MAX_NPUSH = 1024  # the most mini-batches one push may sum
MAX_REPLY = 48 * 1024  # bytes of a STATS reply (a control frame may carry 64 KiB)
MAX_INT = 2**53  # reported integers and floats stay below this (exact in a float64)
# The numbers a worker may report in STATS (anything else is refused), and their types.
STATS_FIELDS = {"loss": float, "steps": int, "images": int, "pushes": int, "fetches": int,
                "images_per_second": float, "lr": float, "seconds": float, "reconnects": int}
FINISHED = "training is already finished"  # the refusal a (re)joining worker gets at the end
STOPPING = "server stopping"  # the start of what every request hears from a server stopping early
SERVER_FULL = "server full"  # the start of the refusal beyond max_connections (a transport's)
MAX_EVENT = 400  # characters of an event's text that are kept
CHECKPOINT_FORMAT = 2  # meta["format"] of a full-state checkpoint (docs/checkpoint.md)


def clean_name(name, default):
    """A peer-supplied name as safe printable text (`protocol.clip`) of at most MAX_NAME characters."""
    return clip(name, MAX_NAME) or default


def staleness_bucket(staleness):
    """The histogram key a staleness counts under: itself below EXACT_STALENESS, else the largest
    power of two not above it (128 counts 128..255, 256 counts 256..511, ...). So the histogram
    has at most ~180 keys, however stale a peer claims to be."""
    staleness = int(staleness)
    return staleness if staleness < EXACT_STALENESS else 1 << (staleness.bit_length() - 1)


class StalenessHistogram(collections.Counter):
    """staleness (mini-batches) -> pushes, bounded: `histogram[s] += 1` counts s in its bucket
    (`staleness_bucket`), so no peer can grow metrics.jsonl or the checkpoint with new keys."""

    def __getitem__(self, staleness):
        return super().__getitem__(staleness_bucket(staleness))

    def __setitem__(self, staleness, count):
        super().__setitem__(staleness_bucket(staleness), count)


def check_stats(numbers):
    """`numbers` (a worker's STATS body) as a clean dict; Refused on any unknown or bad field."""
    if len(numbers) > len(STATS_FIELDS):
        raise Refused(f"STATS has {len(numbers)} fields, at most {len(STATS_FIELDS)} are known")
    clean = {}
    for key, value in numbers.items():
        kind = STATS_FIELDS.get(key)
        if kind is None:
            raise Refused(f"STATS field {clip(key, 40)!r} is unknown (known: {', '.join(STATS_FIELDS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Refused(f"STATS field {key!r} must be a number, got {type(value).__name__}")
        if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
            raise Refused(f"STATS field {key!r} is out of range")
        if kind is int and not isinstance(value, int):
            raise Refused(f"STATS field {key!r} must be an integer")
        if not math.isfinite(value) or abs(value) > MAX_INT:
            raise Refused(f"STATS field {key!r} must be finite and below 2**53")
        clean[key] = kind(value)
    return clean


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


def _frozen(vector):
    """`vector`, made read-only: a parameter vector fetches may send (`ParameterServer.params`)."""
    vector.flags.writeable = False
    return vector


def _check_finite(grad):
    if not all_finite(grad):
        raise Refused(f"gradient has {count_not_finite(grad)} NaN/Inf values")


class WorkerState:
    """What the server knows about one worker (reported numbers come from its STATS messages)."""

    def __init__(self, worker_id, name, npush=MAX_NPUSH):
        self.id, self.name, self.npush = worker_id, name, npush
        self.joined = time.time()
        self.left = None  # None while connected, else why it left
        self.fetches = self.pushes = self.missed_rounds = 0
        self.round_streak = 0  # sync: rounds in a row this worker pushed in (see `_update_excused`)
        self.last_staleness = 0
        self.report = {}  # the worker's own numbers: loss, images, images_per_second, ...

    def as_dict(self):
        # The server's own fields come last: a worker's report cannot overwrite them.
        return {**self.report, "id": self.id, "name": self.name, "alive": self.left is None, "left": self.left,
                "fetches": self.fetches, "pushes": self.pushes, "last_staleness": self.last_staleness,
                "missed_rounds": self.missed_rounds}


class ParameterServer:
    def __init__(self, params, *, model_name, fingerprint, total_steps, lr=0.02, warmup_steps=0,
                 optimizer="sgd", momentum=0.0, lr_scale=1.0, sync=False, staleness_lr=False,
                 expected_workers=1, worker_config=None, checkpoint_path=None, checkpoint_every=60.0,
                 eval_every_steps=None, round_timeout=120.0, start_step=0):
        if optimizer not in ("sgd", "adagrad"):
            raise ValueError(f"unknown server optimizer {optimizer!r}; choose sgd or adagrad")
        # The current version's parameters: read-only, and never written again (fetches send this
        # very vector). An update computes the next version into `spare` and swaps the two.
        self.params = _frozen(np.array(params, dtype=np.float32, copy=True))
        self.num_params = self.params.size
        self.spare = None  # a vector the next update may write (an older version nobody sends)
        self.sending = collections.Counter()  # id(parameter vector) -> fetches sending it right now
        self.model_name, self.fingerprint = model_name, fingerprint
        self.total_steps, self.base_lr, self.warmup_steps = total_steps, lr, warmup_steps
        self.schedule = Schedule(lr, total_steps, warmup_steps)
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
        self.optimizer = CheckedUpdate(self.optimizer)
        self.worker_config = dict(worker_config or {})
        # The most mini-batches one push may sum: the run's npush (else nsync), so a peer that
        # declares more cannot spend the run's steps faster than the run was sized for.
        self.max_npush = min(MAX_NPUSH, int(self.worker_config.get("npush") or self.worker_config.get("nsync")
                                            or MAX_NPUSH))

        self.cond = threading.Condition()
        # `start_step`: a warm start that keeps its schedule begins at the snapshot's step count.
        self.version, self.steps, self.start_step = 0, start_step, start_step
        self.pushes = self.fetches = self.rejected = self.discarded = 0
        self.staleness = StalenessHistogram()  # staleness in mini-batches -> number of pushes
        self.steps_at_version = {0: start_step}  # version -> steps then (the last STEPS_MEMORY versions)
        self.first_version = 0  # the oldest version ever in steps_at_version (the resumed one)
        self.workers = {}  # id -> WorkerState, including the last MAX_DEPARTED that left
        self.next_id = 1
        self.departed = 0  # workers that left and are no longer listed in `workers`
        self.events = collections.deque(maxlen=100)  # (time, text): joins, leaves, rejections
        self.stopped = False
        self.interrupted = False  # stopped before training was over: workers hear STOPPING, not "finished"
        self.started = time.time()
        # Nobody gets parameters before `expected_workers` have joined, so they all start together.
        self.expected_workers = expected_workers
        self.ready = threading.Event()
        self.ready_time = None  # time.perf_counter() when training started

        # Sync mode: the round being gathered.
        self.round_sum = np.zeros(self.num_params, dtype=np.float32) if sync else None
        self.round_members, self.round_batches = set(), 0
        self.round_timeout = round_timeout  # seconds a sync round waits for its last push
        self.round_deadline = None  # (version of the round, time.monotonic() it expires)
        self.round_excused = set()  # missed a round's deadline and not pushed since: not waited for

        # Test evaluations at exact step counts: when an update crosses a multiple of
        # eval_every_steps, a copy of the parameters waits here for the monitor.
        self.eval_every_steps = eval_every_steps
        self.next_eval_step = eval_every_steps and (start_step // eval_every_steps + 1) * eval_every_steps
        self.eval_snapshots = collections.deque()  # (params copy, version, steps)

        self.checkpoint_path, self.checkpoint_every = checkpoint_path, checkpoint_every
        self.checkpoint_lock = threading.Lock()  # one writer at a time; never held with `cond`
        self.last_checkpoint = time.monotonic()
        self.checkpoints = self.checkpoint_failures = 0
        self.checkpoint_error = None  # the last failure's one-line reason, until a checkpoint succeeds
        self.resumed_from = None  # meta of the checkpoint this run resumed from

    # ------------------------------------------------------------------ small helpers

    @property
    def done(self):
        return self.stopped or self.steps >= self.total_steps

    @property
    def mode(self):
        return "sync" if self.sync else "async"

    def lr(self):
        """The run's learning rate now: single-process training's schedule at the server's step count."""
        return self.schedule(self.steps)

    def worker_schedule(self):
        """The schedule the workers step with: the run's, times `lr_scale`."""
        return Schedule(self.base_lr * self.lr_scale, self.total_steps, self.warmup_steps)

    def staleness_of(self, base_version):
        """Mini-batches applied since the worker fetched version `base_version` (never negative).

        A version older than the server remembers (more than STEPS_MEMORY versions back, or from
        before a resume) counts from the oldest version it does remember: capped, never a KeyError."""
        oldest = max(self.first_version, self.version - STEPS_MEMORY + 1)
        steps_then = self.steps_at_version.get(min(max(base_version, oldest), self.version))
        return max(0, self.steps - (self.steps if steps_then is None else steps_then))

    def push_scale(self, batches, staleness):
        """What a push of `batches` mini-batches, `staleness` mini-batches stale, is multiplied by
        before it is subtracted (the caller holds the lock).

        SGD: a push is the displacement the worker moved, so the scale is 1, whatever the
        schedule did since it stepped; with the server's momentum a push of k carries the
        (1 - m**k) / (1 - m) of the k mini-batches its decay m**k stands for. Adagrad: a push is a
        plain gradient sum, stepped at the schedule's lr now. `staleness_lr`: times k / (k + s)."""
        if self.optimizer_name == "adagrad":
            scale = self.lr() * self.lr_scale
        elif self.momentum and batches > 1:
            scale = (1.0 - self.momentum**batches) / (1.0 - self.momentum)
        else:
            scale = 1.0
        if self.staleness_lr:
            scale *= batches / (batches + staleness)
        return scale

    def live_ids(self):
        return {wid for wid, w in self.workers.items() if w.left is None}

    def log(self, text):
        """Keep an event for the dashboard; its text is made safe (`clip`) whatever it quotes."""
        self.events.append((time.time(), clip(text, MAX_EVENT)))

    def recent_events(self, n):
        with self.cond:
            return list(self.events)[-n:]

    def reject(self, who, reason):
        """Count and log a rejected request (the transport calls this for malformed frames too)."""
        with self.cond:
            self.rejected += 1
            self.log(f"rejected {clip(who, 80)}: {clip(reason)}")

    # ------------------------------------------------------------------ workers come and go

    def join(self, fingerprint, info):
        """Admit a worker whose model matches ours; returns its id. Refused otherwise."""
        if fingerprint != self.fingerprint:
            raise Refused(f"model mismatch: the worker has {clip(fingerprint, 100)}, the server has {self.fingerprint}")
        npush = self._allowed_npush(info)
        with self.cond:
            if self.done:
                raise Stopping(f"{STOPPING}: try again later") if self.interrupted else Refused(FINISHED)
            wid, self.next_id = self.next_id, self.next_id + 1
            self.workers[wid] = WorkerState(wid, clean_name(info.get("name", ""), f"worker {wid}"), npush)
            self.log(f"worker {wid} ({self.workers[wid].name}) joined")
            if len(self.live_ids()) >= self.expected_workers:
                self.begin()
            return wid

    def begin(self):
        """Let training start (normally when the expected workers have joined)."""
        if not self.ready.is_set():
            self.ready_time = time.perf_counter()
            self.ready.set()

    def _allowed_npush(self, info):
        """The most mini-batches this worker may sum per push: its declared "npush" (HELLO), else
        the run's; never more than the run's npush (`max_npush`: its --npush, else --nsync)."""
        npush = info.get("npush", self.max_npush)
        if isinstance(npush, bool) or not isinstance(npush, int) or not 1 <= npush <= self.max_npush:
            raise Refused(f"npush must be an integer from 1 to {self.max_npush} (this server's --nsync/--npush), "
                          f"got {clip(npush, 30)}")
        return npush

    def welcome(self, worker_id):
        """What a worker needs to know to start: its id, the version and step count, the lr
        schedule it steps with, the run's settings."""
        with self.cond:
            return {"worker_id": worker_id, "lr": self.lr() * self.lr_scale, "mode": self.mode,
                    "version": self.version, "steps": self.steps,
                    "schedule": self.worker_schedule().as_dict(), **self.worker_config}

    def leave(self, worker_id, reason):
        """A worker is gone (said BYE, hung up, timed out). Training goes on with the others."""
        with self.cond:
            worker = self.workers.get(worker_id)
            if worker is None or worker.left is not None:
                return
            worker.left = reason = clip(reason)
            self.log(f"worker {worker_id} left: {reason}")
            self._prune_departed()
            if self.sync:
                self._maybe_finish_round()  # the round may have been waiting for this worker only
            self.cond.notify_all()

    def _prune_departed(self):
        """Keep only the last MAX_DEPARTED workers that left (caller holds the lock)."""
        gone = [wid for wid, w in self.workers.items() if w.left is not None]
        for wid in gone[: max(0, len(gone) - MAX_DEPARTED)]:
            del self.workers[wid]
            self.departed += 1

    def report(self, worker_id, numbers):
        """Store a worker's own statistics (loss, images/s...) for the dashboard and the run.

        Refused, storing nothing, unless every field is one of STATS_FIELDS with a sane value.
        """
        numbers = check_stats(numbers)
        with self.cond:
            if worker_id in self.workers:
                self.workers[worker_id].report = numbers

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

    @contextlib.contextmanager
    def fetch_snapshot(self, worker_id):
        """`with ps.fetch_snapshot(wid) as (params, version, done):` send `params` to the worker.

        `params` is the current version's vector itself (read-only), shared by every fetch of
        that version: no copy at all, and the lock is not held while it is sent. An update never
        writes into a vector that is being sent (`sending`), so the network may be as slow as it likes.
        """
        self.ready.wait()
        with self.cond:
            params, version, done = self.params, self.version, self.done
            self.sending[id(params)] += 1
            self.fetches += 1
            if worker_id in self.workers:
                self.workers[worker_id].fetches += 1
        try:
            yield params, version, done
        finally:
            with self.cond:
                self.sending[id(params)] -= 1
                if not self.sending[id(params)]:
                    del self.sending[id(params)]

    def push(self, worker_id, grad, base_version, batches=1):
        """Apply (async) or gather (sync) one pushed gradient sum; returns {"version", "lr", "done"}.

        Raises Refused, with the parameters untouched, if anything about the push is wrong.
        """
        self._check_batches(worker_id, batches)
        grad = np.asarray(grad)
        if grad.dtype != np.float32 or grad.shape != (self.num_params,):
            raise Refused(f"gradient must be float32[{self.num_params}], got {grad.dtype}{list(grad.shape)}")
        if batches < 1:
            raise Refused(f"a push must sum at least one mini-batch, got {batches}")
        if self.sync:  # (async: the update checks the gradient as it goes, `minasgd.ps.update`)
            _check_finite(grad)
        with self.cond:
            worker = self.workers.get(worker_id)
            if worker is None or worker.left is not None:
                raise Refused(f"worker {worker_id} is not connected")
            if base_version > self.version:
                raise Refused(f"gradient claims server version {base_version}, but the server is at {self.version}")
            if self.done:
                if self.interrupted:
                    raise Stopping(f"{STOPPING}: push not applied; reconnect and fetch again")
                _check_finite(grad)
                self.discarded += 1
                return self._reply()
            # BEGIN SOLUTION task 6.1: the push's staleness (mini-batches applied since base_version) is counted in self.staleness, worker.pushes, worker.last_staleness and self.pushes; in async mode it is applied at once at the scale its size and staleness call for, and the reply returned; a refused push counts nothing
            staleness = self.staleness_of(base_version)
            if not self.sync:
                self._apply(grad, self.push_scale(batches, staleness), batches)
            self.staleness[staleness] += 1
            worker.pushes += 1
            worker.last_staleness = staleness
            self.pushes += 1
            if not self.sync:
                return self._reply()
            # END SOLUTION
            # Sync: add to this round, then wait until the round has been applied.
            self.round_sum += grad
            self.round_members.add(worker_id)
            self.round_batches += batches
            my_round = self.version
            self._maybe_finish_round()
            while self.version == my_round and not self.stopped:
                self.cond.wait(timeout=min(1.0, self.round_timeout))
                self._enforce_round_deadline(my_round)
            if self.version == my_round and self.interrupted:  # stopped before the round was applied
                raise Stopping(f"{STOPPING}: the sync round was not applied; reconnect and fetch again")
            return self._reply()

    def _check_batches(self, worker_id, batches):
        """A push may sum from 1 to the worker's npush mini-batches (a forged count could end the run)."""
        worker = self.workers.get(worker_id)
        limit = worker.npush if worker is not None else self.max_npush
        if batches > limit:
            raise Refused(f"a push may sum at most {limit} mini-batches (this worker's npush), got {batches}")

    def _enforce_round_deadline(self, my_round):
        """Sync mode, waiting for round `my_round` (caller holds the lock): once the round is
        `round_timeout` seconds old, drop the live workers that have not pushed in it."""
        now = time.monotonic()
        if self.round_deadline is None or self.round_deadline[0] != my_round:
            self.round_deadline = (my_round, now + self.round_timeout)
        elif now >= self.round_deadline[1] and self.version == my_round:
            missing = self.live_ids() - self.round_members - self.round_excused
            for wid in sorted(missing):
                self.workers[wid].missed_rounds += 1
                self.log(f"worker {wid} missed the sync round's {self.round_timeout:g} s deadline: rounds go on "
                         f"without it until it pushes in {self._rounds_to_return(wid)} rounds in a row")
            self.round_excused |= missing
            self._maybe_finish_round()

    def _apply(self, grad, scale, batches):
        """One optimizer update (the caller holds the lock); Refused, changing nothing, if not finite."""
        # BEGIN SOLUTION task 6.1: self.params after one optimizer step with grad at this scale, and the counters (version, steps) after one update of `batches` mini-batches
        if self.optimizer_name == "sgd":
            self.optimizer.optimizer.momentum = self.momentum**batches  # per mini-batch: m**k for a push of k
        self.params = self._updated(grad, scale)
        self.version += 1
        self.steps += batches
        # END SOLUTION
        self.steps_at_version[self.version] = self.steps
        self.steps_at_version.pop(self.version - STEPS_MEMORY, None)
        if self.eval_every_steps and self.steps >= self.next_eval_step:
            self.eval_snapshots.append((self.params.copy(), self.version, self.steps))
            self.next_eval_step = (self.steps // self.eval_every_steps + 1) * self.eval_every_steps

    def _updated(self, grad, scale):
        """The parameters after one optimizer step, as a new read-only vector (caller holds the lock).

        The current vector is never written (fetches may be sending it): the step is computed
        into a spare one, the previous version's vector once no fetch sends it any more (else a
        new one), and the current vector becomes the next spare. Refused if the result is not finite."""
        out = self.spare
        if out is None or self.sending[id(out)]:
            out = np.empty(self.num_params, np.float32)
        out.flags.writeable = True
        error = self.optimizer.step_into(self.params, grad, scale, out)
        if error:
            self.spare = out
            raise Refused(error)
        self.spare = self.params
        return _frozen(out)

    def _maybe_finish_round(self):
        """Sync mode: once every live worker has pushed, apply the round's sum (caller holds the lock)."""
        if not self.round_members or not self.live_ids() - self.round_excused <= self.round_members:
            return
        try:
            self._apply(self.round_sum, self.push_scale(self.round_batches, 0), self.round_batches)
        except Refused as e:  # the sum overflowed the parameters: drop the round, keep the barrier moving
            self.log(f"sync round discarded: {e}")
            self.discarded += len(self.round_members)
            self.version += 1  # a new version with the same parameters and steps, remembered as any other
            self.steps_at_version[self.version] = self.steps
            self.steps_at_version.pop(self.version - STEPS_MEMORY, None)
        self._update_excused()
        self.round_sum[...] = 0
        self.round_members, self.round_batches = set(), 0
        self.cond.notify_all()

    def _rounds_to_return(self, worker_id):
        """Rounds in a row an excused worker must push in before rounds wait for it again: 2 after
        its first missed deadline, doubling with each one after (at most 1024), so a peer that
        skips every other round costs a few deadlines in all, not one per skipped round."""
        return 2 ** min(self.workers[worker_id].missed_rounds, 10)

    def _update_excused(self):
        """Sync mode, as a round is applied (caller holds the lock): count each live worker's
        rounds in a row, and wait again for an excused one that has pushed in enough of them."""
        for wid in self.live_ids():
            worker = self.workers[wid]
            worker.round_streak = worker.round_streak + 1 if wid in self.round_members else 0
            if wid in self.round_excused and worker.round_streak >= self._rounds_to_return(wid):
                self.round_excused.discard(wid)
                self.log(f"worker {wid} pushed in {worker.round_streak} rounds in a row: rounds wait for it again")

    def _reply(self):
        # "steps": where the run is, for the worker's own schedule; "lr": the workers' lr now (shown).
        return {"version": self.version, "steps": self.steps, "lr": self.lr() * self.lr_scale, "done": self.done}

    # ------------------------------------------------------------------ checkpoints and shutdown

    def take_eval_snapshot(self):
        """The oldest waiting (params, version, steps) to evaluate, or None."""
        with self.cond:
            return self.eval_snapshots.popleft() if self.eval_snapshots else None

    def snapshot(self):
        """(params copy, version, steps), consistent."""
        with self.cond:
            return self.params.copy(), self.version, self.steps

    def full_state(self):
        """(params, optimizer state, meta): everything `resume` needs, copied under the lock."""
        with self.cond:
            meta = {"format": CHECKPOINT_FORMAT, "version": self.version, "steps": self.steps,
                    "total_steps": self.total_steps, "lr": self.base_lr, "warmup_steps": self.warmup_steps,
                    "mode": self.mode, "optimizer": self.optimizer_name, "pushes": self.pushes,
                    "fetches": self.fetches, "rejected": self.rejected, "discarded": self.discarded,
                    "checkpoints": self.checkpoints + 1,
                    "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
                    "train_seconds": self.train_seconds()}
            state = {k: np.array(v, dtype=np.float32, copy=True) for k, v in self.optimizer.state().items()}
            return self.params.copy(), state, meta

    def train_seconds(self):
        """Seconds of training so far, counting the runs this one resumed (caller may hold the lock)."""
        before = self.resumed_from.get("train_seconds", 0.0) if self.resumed_from else 0.0
        return before + (0.0 if self.ready_time is None else time.perf_counter() - self.ready_time)

    def checkpoint(self):
        """Write the full state to checkpoint_path atomically (the lock is held only for the copy).

        Returns the path, or None if there is none or writing failed (a full or read-only disk):
        then the previous checkpoint stays as it was, the failure is logged, counted and kept in
        `checkpoint_error`, training goes on and the next interval tries again.
        """
        if self.checkpoint_path is None:
            return None
        with self.checkpoint_lock:
            self.last_checkpoint = time.monotonic()
            params, state, meta = self.full_state()
            try:
                path = checkpoint.save(self.checkpoint_path, self.model_name, self.fingerprint, params, meta, state)
            except OSError as e:
                with self.cond:
                    self.checkpoint_failures += 1
                    self.checkpoint_error = (f"checkpoint failed: {e.strerror or e}; training goes on, "
                                             f"keeping the last good one")
                    self.log(self.checkpoint_error)
                return None
            with self.cond:
                self.checkpoints += 1
                self.checkpoint_error = None
            return path

    def resume(self, ckpt):
        """Continue from a full-state checkpoint (`minasgd.checkpoint.load`'s dict): parameters,
        optimizer state, version, steps (so the lr schedule's position), counters, staleness.

        Everything is checked before anything changes (`check_meta`, finite parameters and
        optimizer state of the right shapes): ValueError (one line) if it is not a sound
        full-state checkpoint of this model and optimizer, and the server stays as it was."""
        if ckpt["fingerprint"] != self.fingerprint:
            raise ValueError(f"cannot resume: the checkpoint is for {clip(ckpt['fingerprint'], 100)}, "
                             f"not {self.fingerprint}")
        meta = check_meta(ckpt["meta"], self.optimizer_name)
        params = np.asarray(ckpt["params"])
        if params.shape != self.params.shape:
            raise ValueError(f"cannot resume: {params.size} parameters, the model has {self.num_params}")
        if not all_finite(np.ascontiguousarray(params, dtype=np.float32)):
            raise ValueError(f"cannot resume: the parameters hold {count_not_finite(params)} NaN/Inf values")
        for name, vector in ckpt["state"].items():
            vector = np.asarray(vector, dtype=np.float32)
            if vector.shape != self.params.shape or not all_finite(vector) or (name == "sum_sq" and (vector < 0).any()):
                raise ValueError(f"cannot resume: optimizer state {clip(name, 40)!r} is not a finite "
                                 f"float32[{self.num_params}] of the right sign")
        staleness = StalenessHistogram()
        for key, count in meta["staleness"].items():
            staleness[int(key)] += count
        with self.cond:
            self.optimizer.load_state(ckpt["state"])  # ValueError, changing nothing, if a vector is missing
            self.params = _frozen(np.array(params, dtype=np.float32, copy=True))
            self.version, self.steps = meta["version"], meta["steps"]
            for key in ("pushes", "fetches", "rejected", "discarded", "checkpoints"):
                setattr(self, key, meta[key])
            self.staleness = staleness
            self.steps_at_version = {self.version: self.steps}
            self.first_version = self.version  # pushes based on older versions count from here
            if self.eval_every_steps:
                self.next_eval_step = (self.steps // self.eval_every_steps + 1) * self.eval_every_steps
            self.resumed_from = meta
            self.log(f"resumed at version {self.version}, step {self.steps}/{self.total_steps}")

    def maybe_checkpoint(self):
        """Checkpoint if `checkpoint_every` seconds have passed since the last one."""
        if self.checkpoint_every and time.monotonic() - self.last_checkpoint >= self.checkpoint_every:
            return self.checkpoint()
        return None

    def stop(self, interrupted=False):
        """End training now: waiting pushes are released and every later request hears 'done'.

        `interrupted`: the server stops before training is over (a signal, an error): then every
        request hears STOPPING instead, so the workers keep reconnecting (for their --reconnect
        seconds) to the server that resumes the run, rather than exiting as if it were finished."""
        with self.cond:
            self.interrupted = self.interrupted or (interrupted and self.steps < self.total_steps)
            self.stopped = True
            self.begin()  # nobody waits for workers that will not come
            self.cond.notify_all()

    # ------------------------------------------------------------------ statistics

    def stats(self, max_workers=None):
        """Everything worth showing or keeping, as plain JSON-able values.

        `max_workers`: list only the first this many workers (the reply to a worker's STATS, which
        must stay within a control frame's 64 KiB); `workers_listed` < `workers_total` then.
        """
        with self.cond:
            workers = list(self.workers.values())
            return {
                "mode": self.mode, "optimizer": self.optimizer_name, "version": self.version,
                "steps": self.steps, "total_steps": self.total_steps, "lr": self.lr(), "done": self.done,
                "pushes": self.pushes, "fetches": self.fetches, "rejected": self.rejected,
                "discarded": self.discarded, "checkpoints": self.checkpoints,
                "checkpoint_failures": self.checkpoint_failures, "checkpoint_error": self.checkpoint_error,
                "staleness": {str(k): v for k, v in sorted(self.staleness.items())},
                "workers": [w.as_dict() for w in workers[:max_workers]],
                "workers_total": len(workers) + self.departed, "departed_unlisted": self.departed,
                "seconds": time.time() - self.started,
            }

    def stats_reply(self):
        """The answer to a worker's STATS: `stats()` with at most 32 workers listed. Each entry is
        bounded (MAX_NAME, STATS_FIELDS), so the reply stays well under MAX_JSON."""
        reply = self.stats(max_workers=32)
        if len(json.dumps(reply)) > MAX_REPLY:  # a histogram with very many staleness values
            reply["staleness"] = {}
        return reply

"""The parameter server's state and rules, with no networking in sight.

    ps = ParameterServer(params, model_name="tiny", fingerprint=model.fingerprint(), total_steps=2000)
    wid = ps.join(fingerprint, {"name": "host:1234"})     # Refused if the model differs
    version, done = ps.fetch_into(wid, buffer)              # a consistent copy of the parameters
    with ps.fetch_snapshot(wid) as (params, version, done): ...   # the same, shared: no copy
    reply = ps.push(wid, step_sum, base_version, batches=4)   # {"version", "steps", "lr", "done"}
    ps.leave(wid, "connection reset")

A transport (`minasgd.ps.tcp` over sockets, `minasgd.ps.mpi` over MPI) turns each worker's messages into
these calls, one thread per worker. One lock (a Condition) guards all the state, so any number of
threads may call in at once. This class holds the lock and the counters and puts together units
that each do one job, with no lock of their own (read them for the details):

    update.py     the update rule whole: what a push means, its scale, the checked out-of-place step
    sync.py       the sync round: its sum, its members, its deadline, the excused workers
    registry.py   the workers: ids, names, npush, who is connected, their STATS (`check_stats`)
    staleness.py  staleness in mini-batches (version -> steps) and its bounded histogram
    resume.py     checkpoints of the whole state, and the checks before a resume
    stats.py      the statistics: what the dashboard, metrics.jsonl and a worker's STATS see
    protocol.py   the words both sides share: Refused and its codes, STATS_FIELDS, MAX_NPUSH

The rules (each unit's docstring has the details):
- Training starts when `expected_workers` have joined: until then FETCH waits.
- `version` counts the updates applied; `steps` the mini-batches behind them. The lr follows
  single-process training's schedule over `steps`; training is over when `steps` reaches `total_steps`.
- A push is what the worker MOVED (`minasgd.ps.worker`), applied as it is or 1 / N of it
  (`--lr-scaling average`: model averaging; `update.py`); with one
  worker the server follows single-process training's path exactly (bit for bit at nsync 1).
  What --lr and --momentum mean with N workers is decided in one place,
  `minasgd.ps.run.worker_settings`: the workers' momentum and `lr_scale`.
- Sync (the default of `minasgd train --workers`): the SUM of one push per live worker (scaled as
  --lr-scaling says) is applied as ONE update (`sync.py`: deadlines, excused workers). Async (the
  paper, `--async`): each push is applied the moment it arrives.
- Everything about a push is checked BEFORE the parameters change (size, finiteness, version,
  npush, worker): `Refused`, and the parameters stay bit-identical, also when the result of the
  update would not be finite.
- Fetches send the current read-only vector itself, without a copy or the lock; an update never
  writes into a vector being sent.
- `stop(interrupted=True)` (a signal, an error): every request then hears STOPPING ("server
  stopping"), never "training finished", so the workers reconnect to the resumed server.
"""

import collections
import contextlib
import threading
import time

import numpy as np

from ..optim import Schedule
from .protocol import FINISHED_TEXT, MAX_NPUSH, STOPPING_TEXT, Finished, Refused, Stopping, clip
from .registry import WorkerRegistry, check_stats
from .resume import CHECKPOINT_FORMAT, Checkpointer, check_checkpoint
from .staleness import StalenessHistogram, VersionClock
from .stats import server_stats, stats_reply
from .sync import SyncRound
from .update import UpdateRule, all_finite, count_not_finite, frozen

FINISHED, STOPPING = FINISHED_TEXT, STOPPING_TEXT  # what a refused (re)join and a stopping server say
MAX_EVENT = 400  # characters of an event's text that are kept


def _check_finite(grad):
    if not all_finite(grad):
        raise Refused(f"gradient has {count_not_finite(grad)} NaN/Inf values")


def _part(unit, name):
    """A property for `self.<unit>.<name>`: the state a unit owns, under the server's name for it."""
    return property(lambda self: getattr(getattr(self, unit), name),
                    lambda self, value: setattr(getattr(self, unit), name, value))


class ParameterServer:
    def __init__(self, params, *, model_name, fingerprint, total_steps, lr=0.02, warmup_steps=0,
                 optimizer="sgd", momentum=0.0, lr_scale=1.0, push_fraction=1.0, sync=False, staleness_lr=False,
                 expected_workers=1, worker_config=None, checkpoint_path=None, checkpoint_every=60.0,
                 eval_every_steps=None, round_timeout=120.0, start_step=0):
        # The rule for a push (`minasgd.ps.update`): optimizer, scale, the checked out-of-place step.
        # `lr_scale` is the factor on the workers' schedule, `push_fraction` the fraction of a push
        # that is applied (`minasgd.ps.run.worker_settings`).
        params = np.array(params, dtype=np.float32, copy=True)
        self.update = UpdateRule(params.size, optimizer=optimizer, momentum=momentum,
                                 staleness_lr=staleness_lr, lr_scale=lr_scale, push_fraction=push_fraction)
        # The current version's parameters: read-only, and never written again (fetches send this
        # very vector). An update computes the next version into a spare and swaps the two.
        self.params = frozen(params)
        self.num_params = self.params.size
        self.sending = collections.Counter()  # id(parameter vector) -> fetches sending it right now
        self.model_name, self.fingerprint = model_name, fingerprint
        self.total_steps, self.base_lr, self.warmup_steps = total_steps, lr, warmup_steps
        self.schedule = Schedule(lr, total_steps, warmup_steps)
        self.sync, self.staleness_lr, self.lr_scale = sync, staleness_lr, lr_scale
        self.optimizer_name, self.momentum = optimizer, momentum
        self.worker_config = dict(worker_config or {})
        # The most mini-batches one push may sum: the run's npush (else nsync), so a peer that
        # declares more cannot spend the run's steps faster than the run was sized for.
        self.max_npush = min(MAX_NPUSH, int(self.worker_config.get("npush") or self.worker_config.get("nsync")
                                            or MAX_NPUSH))
        self.registry = WorkerRegistry(self.max_npush)  # who joined, who is connected (`minasgd.ps.registry`)

        self.cond = threading.Condition()
        # `start_step`: a warm start that keeps its schedule begins at the snapshot's step count.
        self.version, self.steps, self.start_step = 0, start_step, start_step
        self.pushes = self.fetches = self.rejected = self.discarded = 0
        self.staleness = StalenessHistogram()  # staleness in mini-batches -> number of pushes
        self.clock = VersionClock(0, start_step)  # version -> steps then (`minasgd.ps.staleness`)
        self.events = collections.deque(maxlen=100)  # (time, text): joins, leaves, rejections
        self.stopped = False
        self.interrupted = False  # stopped before training was over: workers hear STOPPING, not "finished"
        self.started = time.time()
        # Nobody gets parameters before `expected_workers` have joined, so they all start together.
        self.expected_workers = expected_workers
        self.ready = threading.Event()
        self.ready_time = None  # time.perf_counter() when training started
        self.round = SyncRound(self.num_params, round_timeout) if sync else None  # `minasgd.ps.sync`

        # Test evaluations at exact step counts: when an update crosses a multiple of
        # eval_every_steps, a copy of the parameters waits here for the monitor.
        self.eval_every_steps = eval_every_steps
        self.next_eval_step = eval_every_steps and (start_step // eval_every_steps + 1) * eval_every_steps
        self.eval_snapshots = collections.deque()  # (params copy, version, steps)

        self.saver = Checkpointer(checkpoint_path, checkpoint_every)  # `minasgd.ps.resume`
        self.resumed_from = None  # meta of the checkpoint this run resumed from

    # The state each unit owns, under the names the server has always shown it by.
    optimizer = property(lambda self: self.update.optimizer)
    workers, departed = _part("registry", "workers"), _part("registry", "departed")
    round_members, round_excused, round_sum = _part("round", "members"), _part("round", "excused"), _part("round", "sum")
    checkpoint_path, checkpoint_every = _part("saver", "path"), _part("saver", "every")
    last_checkpoint, checkpoints = _part("saver", "last"), _part("saver", "count")
    checkpoint_failures, checkpoint_error = _part("saver", "failures"), _part("saver", "error")

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
        """Mini-batches applied since the worker fetched version `base_version` (never negative,
        capped at the oldest version remembered: `minasgd.ps.staleness.VersionClock`)."""
        return self.clock.staleness(base_version, self.version, self.steps)

    def push_scale(self, batches, staleness):
        """What a push of `batches` mini-batches, `staleness` stale, is multiplied by before it is
        subtracted (`minasgd.ps.update.UpdateRule.scale`; the caller holds the lock)."""
        return self.update.scale(batches, staleness, self.lr)

    def live_ids(self):
        return self.registry.live_ids()

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
        npush = self.registry.allowed_npush(info)
        with self.cond:
            if self.done:
                raise Stopping(f"{STOPPING}: try again later") if self.interrupted else Finished(FINISHED)
            worker = self.registry.add(info, npush)
            self.log(f"worker {worker.id} ({worker.name}) joined")
            if len(self.live_ids()) >= self.expected_workers:
                self.begin()
            return worker.id

    def begin(self):
        """Let training start (normally when the expected workers have joined)."""
        if not self.ready.is_set():
            self.ready_time = time.perf_counter()
            self.ready.set()

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
            worker = self.registry.leave(worker_id, reason)
            if worker is None:
                return
            self.log(f"worker {worker_id} left: {worker.left}")
            if self.sync:
                self._maybe_finish_round()  # the round may have been waiting for this worker only
            self.cond.notify_all()

    def report(self, worker_id, numbers):
        """Store a worker's own statistics (loss, images/s...) for the dashboard and the run.

        Refused, storing nothing, unless every field is one of STATS_FIELDS with a sane value.
        """
        numbers = check_stats(numbers)
        with self.cond:
            self.registry.report(worker_id, numbers)

    # ------------------------------------------------------------------ fetch and push

    def fetch_into(self, worker_id, out):
        """Copy the parameters into `out` (float32[num_params]); returns (version, done).

        The copy, made under the lock, is a consistent snapshot: a slow network never holds the lock.
        """
        self.ready.wait()
        with self.cond:
            np.copyto(out, self.params)
            self._count_fetch(worker_id)
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
            self._count_fetch(worker_id)
        try:
            yield params, version, done
        finally:
            with self.cond:
                self.sending[id(params)] -= 1
                if not self.sending[id(params)]:
                    del self.sending[id(params)]

    def _count_fetch(self, worker_id):
        self.fetches += 1
        if worker_id in self.workers:
            self.workers[worker_id].fetches += 1

    def push(self, worker_id, grad, base_version, batches=1):
        """Apply (async) or gather (sync) one pushed gradient sum; returns {"version", "lr", "done"}.

        Raises Refused, with the parameters untouched, if anything about the push is wrong.
        """
        grad = self._checked_push(worker_id, grad, batches)
        with self.cond:
            worker = self.registry.connected(worker_id)
            if worker is None:
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
            self.round.add(worker_id, grad, batches)
            my_round = self.version
            self._maybe_finish_round()
            while self.version == my_round and not self.stopped:
                self.cond.wait(timeout=min(1.0, self.round.timeout))
                if self.round.expire(my_round, self.version, self.live_ids(), self.workers, self.log):
                    self._maybe_finish_round()
            if self.version == my_round and self.interrupted:  # stopped before the round was applied
                raise Stopping(f"{STOPPING}: the sync round was not applied; reconnect and fetch again")
            return self._reply()

    def _checked_push(self, worker_id, grad, batches):
        """The pushed vector, if its size and count are right (and, sync, it is finite); else Refused.
        A push may sum from 1 to the worker's npush mini-batches (a forged count could end the run)."""
        limit = self.registry.npush_of(worker_id)
        if batches > limit:
            raise Refused(f"a push may sum at most {limit} mini-batches (this worker's npush), got {batches}")
        grad = np.asarray(grad)
        if grad.dtype != np.float32 or grad.shape != (self.num_params,):
            raise Refused(f"gradient must be float32[{self.num_params}], got {grad.dtype}{list(grad.shape)}")
        if batches < 1:
            raise Refused(f"a push must sum at least one mini-batch, got {batches}")
        if self.sync:  # (async: the update checks the gradient as it goes, `minasgd.ps.update`)
            _check_finite(grad)
        return grad

    def _apply(self, grad, scale, batches):
        """One optimizer update (the caller holds the lock); Refused, changing nothing, if not finite."""
        # BEGIN SOLUTION task 6.1: self.params after one optimizer step with grad at this scale, and the counters (version, steps) after one update of `batches` mini-batches
        self.params = self.update.step(self.params, grad, scale, batches, in_use=lambda v: self.sending[id(v)])
        self.version += 1
        self.steps += batches
        # END SOLUTION
        self.clock.remember(self.version, self.steps)
        if self.eval_every_steps and self.steps >= self.next_eval_step:
            self.eval_snapshots.append((self.params.copy(), self.version, self.steps))
            self.next_eval_step = (self.steps // self.eval_every_steps + 1) * self.eval_every_steps

    def _maybe_finish_round(self):
        """Sync mode: once every live worker has pushed, apply the round's sum (caller holds the lock)."""
        live = self.live_ids()
        if not self.round.complete(live):
            return
        total, batches, members = self.round.take()
        try:
            self._apply(total, self.push_scale(batches, 0), batches)
        except Refused as e:  # the sum overflowed the parameters: drop the round, keep the barrier moving
            self.log(f"sync round discarded: {e}")
            self.discarded += len(members)
            self.version += 1  # a new version with the same parameters and steps, remembered as any other
            self.clock.remember(self.version, self.steps)
        self.round.settle(live, members, self.workers, self.log)
        self.cond.notify_all()

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
                    "checkpoints": self.checkpoints + 1, "staleness": self.staleness.as_json(),
                    "train_seconds": self.train_seconds()}
            return self.params.copy(), self.update.state(), meta

    def train_seconds(self):
        """Seconds of training so far, counting the runs this one resumed (caller may hold the lock)."""
        before = self.resumed_from.get("train_seconds", 0.0) if self.resumed_from else 0.0
        return before + (0.0 if self.ready_time is None else time.perf_counter() - self.ready_time)

    def checkpoint(self):
        """Write the full state to checkpoint_path atomically (`minasgd.ps.resume.Checkpointer`).

        Returns the path, or None if there is none or writing failed (a full or read-only disk):
        then the previous checkpoint stays as it was, the failure is logged, counted and kept in
        `checkpoint_error`, training goes on and the next interval tries again.
        """
        return self.saver.write(self.model_name, self.fingerprint, self.full_state, self.cond, self.log)

    def maybe_checkpoint(self):
        """Checkpoint if `checkpoint_every` seconds have passed since the last one."""
        return self.checkpoint() if self.saver.due() else None

    def resume(self, ckpt):
        """Continue from a full-state checkpoint (`minasgd.checkpoint.load`'s dict): parameters,
        optimizer state, version, steps (so the lr schedule's position), counters, staleness.

        Everything is checked before anything changes (`minasgd.ps.resume.check_checkpoint`):
        ValueError (one line) if it is not a sound full-state checkpoint of this model and
        optimizer, and the server stays as it was."""
        params, meta, staleness = check_checkpoint(ckpt, self.fingerprint, self.optimizer_name, self.num_params)
        with self.cond:
            self.update.load_state(ckpt["state"])  # ValueError, changing nothing, if a vector is missing
            self.params = frozen(params)
            self.version, self.steps = meta["version"], meta["steps"]
            for key in ("pushes", "fetches", "rejected", "discarded", "checkpoints"):
                setattr(self, key, meta[key])
            self.staleness = staleness
            self.clock.reset(self.version, self.steps)  # pushes based on older versions count from here
            if self.eval_every_steps:
                self.next_eval_step = (self.steps // self.eval_every_steps + 1) * self.eval_every_steps
            self.resumed_from = meta
            self.log(f"resumed at version {self.version}, step {self.steps}/{self.total_steps}")

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

    # ------------------------------------------------------------------ statistics (`minasgd.ps.stats`)

    def stats(self, max_workers=None):
        """Everything worth showing or keeping, as plain JSON-able values (`stats.server_stats`)."""
        return server_stats(self, max_workers)

    def stats_reply(self):
        """The answer to a worker's STATS (`stats.stats_reply`): bounded to fit a control frame."""
        return stats_reply(self)

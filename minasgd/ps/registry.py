"""Who is training: the parameter server's worker registry, with no lock and no networking.

    workers = WorkerRegistry(max_npush=4)
    worker = workers.add({"name": "host:1234", "npush": 4})   # Refused if its npush is out of range
    workers.live_ids()                                         # {1}
    workers.leave(1, "connection reset")                       # the WorkerState, or None if gone already
    check_stats({"loss": 2.3, "images": 640})                  # a STATS body, cleaned; Refused if bad

The caller (`ParameterServer`) holds its lock around every call. No peer can grow the registry
without bound: names are cut to MAX_NAME characters (and made safe, `protocol.clip`), a STATS
body must match STATS_FIELDS, and only the last MAX_DEPARTED workers that left are kept listed;
older ones are only counted (`departed`).
"""

import math
import time

from .protocol import MAX_NPUSH, STATS_FIELDS, Refused, clip

MAX_NAME = 64  # characters of a worker's name that are kept
MAX_DEPARTED = 32  # workers that left and are still listed; older ones are only counted
MAX_INT = 2**53  # reported integers and floats stay below this (exact in a float64)


def clean_name(name, default):
    """A peer-supplied name as safe printable text (`protocol.clip`) of at most MAX_NAME characters."""
    return clip(name, MAX_NAME) or default


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


class WorkerState:
    """What the server knows about one worker (reported numbers come from its STATS messages)."""

    def __init__(self, worker_id, name, npush=MAX_NPUSH):
        self.id, self.name, self.npush = worker_id, name, npush
        self.joined = time.time()
        self.left = None  # None while connected, else why it left
        self.fetches = self.pushes = self.missed_rounds = 0
        self.round_streak = 0  # sync: rounds in a row this worker pushed in (`minasgd.ps.sync`)
        self.last_staleness = 0
        self.report = {}  # the worker's own numbers: loss, images, images_per_second, ...

    def as_dict(self):
        # The server's own fields come last: a worker's report cannot overwrite them.
        return {**self.report, "id": self.id, "name": self.name, "alive": self.left is None, "left": self.left,
                "fetches": self.fetches, "pushes": self.pushes, "last_staleness": self.last_staleness,
                "missed_rounds": self.missed_rounds}


class WorkerRegistry:
    """The workers that joined: ids from 1, their state, who is still connected."""

    def __init__(self, max_npush=MAX_NPUSH):
        self.max_npush = max_npush  # the run's npush (else nsync): no worker may sum more per push
        self.workers = {}  # id -> WorkerState, including the last MAX_DEPARTED that left
        self.next_id = 1
        self.departed = 0  # workers that left and are no longer listed in `workers`

    def allowed_npush(self, info):
        """The most mini-batches this worker may sum per push: its declared "npush" (HELLO), else
        the run's; never more than the run's npush (`max_npush`: its --npush, else --nsync)."""
        npush = info.get("npush", self.max_npush)
        if isinstance(npush, bool) or not isinstance(npush, int) or not 1 <= npush <= self.max_npush:
            raise Refused(f"npush must be an integer from 1 to {self.max_npush} (this server's --nsync/--npush), "
                          f"got {clip(npush, 30)}")
        return npush

    def add(self, info, npush=None):
        """Register a new worker from its HELLO `info`; returns its WorkerState."""
        npush = self.allowed_npush(info) if npush is None else npush
        wid, self.next_id = self.next_id, self.next_id + 1
        worker = self.workers[wid] = WorkerState(wid, clean_name(info.get("name", ""), f"worker {wid}"), npush)
        return worker

    def connected(self, worker_id):
        """The WorkerState of a worker still connected, else None."""
        worker = self.workers.get(worker_id)
        return worker if worker is not None and worker.left is None else None

    def npush_of(self, worker_id):
        """The most mini-batches this worker may sum (the run's limit for an unknown id)."""
        worker = self.workers.get(worker_id)
        return worker.npush if worker is not None else self.max_npush

    def live_ids(self):
        return {wid for wid, w in self.workers.items() if w.left is None}

    def leave(self, worker_id, reason):
        """Mark a worker gone with its (clipped) reason; returns its WorkerState, or None if it was
        unknown or gone already. Keeps only the last MAX_DEPARTED departed workers listed."""
        worker = self.connected(worker_id)
        if worker is None:
            return None
        worker.left = clip(reason)
        gone = [wid for wid, w in self.workers.items() if w.left is not None]
        for wid in gone[: max(0, len(gone) - MAX_DEPARTED)]:
            del self.workers[wid]
            self.departed += 1
        return worker

    def report(self, worker_id, numbers):
        """Keep a worker's checked STATS numbers (an unknown id is ignored)."""
        if worker_id in self.workers:
            self.workers[worker_id].report = numbers

    def listed(self, limit=None):
        """[worker.as_dict()] of the first `limit` listed workers (all by default)."""
        return [w.as_dict() for w in list(self.workers.values())[:limit]]

    def total(self):
        """Every worker that ever joined, listed or not."""
        return len(self.workers) + self.departed

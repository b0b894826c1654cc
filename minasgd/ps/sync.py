"""The sync round (the bulk-synchronous baseline's barrier), with no lock and no networking.

    round = SyncRound(num_params, timeout=120.0)
    round.add(worker_id, grad, batches)          # a push joins the round being gathered
    if round.complete(live_ids):                 # every live worker (not excused) has pushed
        total, batches, members = round.take()   # the round's SUM, applied as ONE update; then reset
        round.settle(live_ids, workers, log)     # count streaks, wait again for returning workers
    round.expire(my_round, version, live_ids, workers, log)   # a waiting push checks the deadline

A push waits until every live worker has pushed once in this round; the SUM of the round's
pushes is then applied as one update. Rounds have a deadline (`timeout` seconds): a live worker
that has not pushed by then is dropped from the round, which is applied without it, and from
every later round (counted in its `missed_rounds`; its pushes still count) until it has pushed in
2 rounds in a row, 4 after a second miss, 8 after a third...: one silent or flaky peer cannot
stall the run. The caller (`ParameterServer`) holds its lock around every call.
"""

import time

import numpy as np


def rounds_to_return(worker):
    """Rounds in a row an excused worker must push in before rounds wait for it again: 2 after
    its first missed deadline, doubling with each one after (at most 1024), so a peer that
    skips every other round costs a few deadlines in all, not one per skipped round."""
    return 2 ** min(worker.missed_rounds, 10)


class SyncRound:
    """The round being gathered: its sum, its members, its deadline; and who is excused."""

    def __init__(self, num_params, timeout=120.0):
        self.sum = np.zeros(num_params, dtype=np.float32)
        self.members, self.batches = set(), 0
        self.timeout = timeout  # seconds a round waits for its last push
        self.deadline = None  # (version of the round, time.monotonic() it expires)
        self.excused = set()  # missed a round's deadline and not pushed enough since: not waited for

    def add(self, worker_id, grad, batches):
        self.sum += grad
        self.members.add(worker_id)
        self.batches += batches

    def complete(self, live_ids):
        """True once every live worker that is not excused has pushed in this round."""
        return bool(self.members) and live_ids - self.excused <= self.members

    def take(self):
        """(the round's sum, its mini-batches, its members). The sum is this round's own vector:
        use it before the next `add`. The round starts over empty (the caller then `settle`s)."""
        taken = self.sum, self.batches, self.members
        self.members, self.batches = set(), 0
        return taken

    def settle(self, live_ids, members, workers, log):
        """After a round of `members` was applied: count each live worker's rounds in a row, wait
        again for an excused one that has pushed in enough of them; zero the sum for the next."""
        for wid in live_ids:
            worker = workers[wid]
            worker.round_streak = worker.round_streak + 1 if wid in members else 0
            if wid in self.excused and worker.round_streak >= rounds_to_return(worker):
                self.excused.discard(wid)
                log(f"worker {wid} pushed in {worker.round_streak} rounds in a row: rounds wait for it again")
        self.sum[...] = 0

    def expire(self, my_round, version, live_ids, workers, log):
        """A push waits for round `my_round` (the server is at `version`): once the round is
        `timeout` seconds old, excuse the live workers that have not pushed in it. Returns True
        if any were excused (the round may now be complete)."""
        now = time.monotonic()
        if self.deadline is None or self.deadline[0] != my_round:
            self.deadline = (my_round, now + self.timeout)
            return False
        if now < self.deadline[1] or version != my_round:
            return False
        missing = live_ids - self.members - self.excused
        for wid in sorted(missing):
            workers[wid].missed_rounds += 1
            log(f"worker {wid} missed the sync round's {self.timeout:g} s deadline: rounds go on "
                f"without it until it pushes in {rounds_to_return(workers[wid])} rounds in a row")
        self.excused |= missing
        return True

"""The parameter server's units, each on its own (no lock, no server, no socket): the update rule
(`ps/update.py`), the sync round (`ps/sync.py`), the worker registry (`ps/registry.py`), the
staleness clock (`ps/staleness.py`) and checkpoint/resume (`ps/resume.py`)."""

import threading

import numpy as np
import pytest

from minasgd.ps import protocol
from minasgd.ps.registry import MAX_DEPARTED, MAX_NAME, WorkerRegistry, check_stats
from minasgd.ps.resume import Checkpointer, check_checkpoint
from minasgd.ps.staleness import STEPS_MEMORY, StalenessHistogram, VersionClock
from minasgd.ps.sync import SyncRound, rounds_to_return
from minasgd.ps.update import UpdateRule

N = 8


# ------------------------------------------------------------------ update.py

def test_sgd_push_is_applied_as_it_is_whatever_the_lr():
    rule = UpdateRule(N)
    assert rule.scale(batches=4, staleness=9, lr_now=lambda: 123.0) == 1.0
    params = np.ones(N, np.float32)
    new = rule.step(params, np.full(N, 0.25, np.float32), 1.0, 4)
    assert np.array_equal(new, np.full(N, 0.75, np.float32)) and not new.flags.writeable
    assert np.array_equal(params, np.ones(N, np.float32))  # only read


def test_server_momentum_decays_per_mini_batch():
    """v = m**k v + push, w -= (1 - m**k) / (1 - m) v: a push of 3 after a push of 1."""
    m, rule = 0.5, UpdateRule(N, momentum=0.5)
    w = rule.step(np.zeros(N, np.float32), np.ones(N, np.float32), rule.scale(1, 0, lambda: 0.1), 1)
    assert np.allclose(w, -1.0) and np.allclose(rule.optimizer.velocity, 1.0)
    scale = rule.scale(3, 0, lambda: 0.1)
    assert scale == pytest.approx((1 - m**3) / (1 - m))
    w = rule.step(w, np.ones(N, np.float32), scale, 3)
    assert np.allclose(rule.optimizer.velocity, m**3 * 1.0 + 1.0)
    assert np.allclose(w, -1.0 - scale * (m**3 + 1.0))
    assert rule.optimizer.momentum == m  # the rule passes m**k itself: the optimizer is not rewritten


def test_adagrad_steps_at_the_lr_now_and_staleness_shrinks_a_push():
    assert UpdateRule(N, optimizer="adagrad", lr_scale=0.5).scale(2, 0, lr_now=lambda: 0.2) == pytest.approx(0.1)
    assert UpdateRule(N, staleness_lr=True).scale(batches=2, staleness=6, lr_now=lambda: 1.0) == pytest.approx(0.25)


def test_a_non_finite_result_changes_nothing():
    rule = UpdateRule(N, momentum=0.9)
    w = rule.step(np.zeros(N, np.float32), np.ones(N, np.float32), 1.0, 1)
    huge = np.full(N, 3e38, np.float32)
    w = rule.step(w, huge, 1.0, 1)  # finite; a second such push overflows
    w_before, velocity = w.copy(), rule.optimizer.velocity.copy()
    with pytest.raises(protocol.Refused, match="the update would make 8 parameters NaN/Inf"):
        rule.step(w, huge, 1.0, 1)
    bad = np.ones(N, np.float32)
    bad[3] = np.nan
    with pytest.raises(protocol.Refused, match="gradient has 1 NaN/Inf"):
        rule.step(w, bad, 1.0, 1)
    assert np.array_equal(rule.optimizer.velocity, velocity) and np.array_equal(w, w_before)


def test_a_vector_being_sent_is_never_written():
    rule = UpdateRule(N)
    first = rule.step(np.zeros(N, np.float32), np.ones(N, np.float32), 1.0, 1)
    sent = rule.spare  # the previous version's vector: the next step would reuse it...
    second = rule.step(first, np.ones(N, np.float32), 1.0, 1, in_use=lambda v: v is sent)
    assert second is not sent  # ...unless a fetch is still sending it


# ------------------------------------------------------------------ sync.py

class W:
    def __init__(self):
        self.missed_rounds = self.round_streak = 0


def test_a_round_is_complete_when_every_live_worker_not_excused_pushed():
    r = SyncRound(N)
    r.add(1, np.ones(N, np.float32), 2)
    assert not r.complete({1, 2})
    r.add(2, np.ones(N, np.float32), 3)
    assert r.complete({1, 2})
    total, batches, members = r.take()
    assert np.array_equal(total, np.full(N, 2.0)) and batches == 5 and members == {1, 2}
    workers = {1: W(), 2: W()}
    r.settle({1, 2}, members, workers, log=lambda text: None)
    assert not r.sum.any() and not r.members and workers[1].round_streak == 1


def test_the_deadline_excuses_the_silent_until_they_push_enough_rounds_in_a_row(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("minasgd.ps.sync.time.monotonic", lambda: now[0])
    r, workers, said = SyncRound(N, timeout=5.0), {1: W(), 2: W()}, []
    r.add(1, np.ones(N, np.float32), 1)
    assert not r.expire(0, 0, {1, 2}, workers, said.append)  # starts the clock
    now[0] += 4.9
    assert not r.expire(0, 0, {1, 2}, workers, said.append)
    now[0] += 0.2
    assert r.expire(0, 0, {1, 2}, workers, said.append) and r.excused == {2}
    assert workers[2].missed_rounds == 1 and rounds_to_return(workers[2]) == 2 and "missed" in said[0]
    assert r.complete({1, 2})
    for _ in range(2):  # 2 pushes in a row bring worker 2 back
        r.add(1, np.ones(N, np.float32), 1)
        r.add(2, np.ones(N, np.float32), 1)
        _, _, members = r.take()
        r.settle({1, 2}, members, workers, said.append)
    assert r.excused == set() and "rounds wait for it again" in said[-1]


# ------------------------------------------------------------------ registry.py

def test_the_registry_bounds_names_departed_and_npush():
    reg = WorkerRegistry(max_npush=4)
    first = reg.add({"name": "x" * 500 + "\x1b[2J"})
    assert len(first.name) == MAX_NAME and first.npush == 4 and first.id == 1
    with pytest.raises(protocol.Refused, match="npush"):
        reg.add({"npush": 5})
    with pytest.raises(protocol.Refused, match="npush"):
        reg.add({"npush": True})
    for _ in range(MAX_DEPARTED + 5):
        reg.leave(reg.add({"npush": 2}).id, "bye")
    assert reg.leave(first.id, "\x1b]52;c;evil\x07").left == "?]52;c;evil?"
    assert reg.leave(first.id, "again") is None  # gone already
    assert len(reg.workers) == MAX_DEPARTED and reg.total() == MAX_DEPARTED + 6 and reg.live_ids() == set()
    assert reg.npush_of(10**9) == 4  # an unknown id: the run's limit


def test_check_stats_takes_only_known_finite_numbers():
    assert check_stats({"loss": 1, "images": 3}) == {"loss": 1.0, "images": 3}
    for bad in ({"loss": float("nan")}, {"images": 1.5}, {"evil": 1}, {"loss": True}, {"images": 2**60}):
        with pytest.raises(protocol.Refused):
            check_stats(bad)


# ------------------------------------------------------------------ staleness.py

def test_staleness_counts_mini_batches_and_caps_what_it_forgot():
    clock = VersionClock(0, 10)
    for v in range(1, 4):
        clock.remember(v, 10 + 4 * v)
    assert clock.staleness(1, 3, 22) == 8 and clock.staleness(3, 3, 22) == 0
    assert clock.staleness(-5, 3, 22) == 12  # older than remembered: from the oldest (version 0)
    clock.reset(3, 22)  # a resume
    assert clock.staleness(1, 3, 22) == 0
    clock.remember(3 + STEPS_MEMORY, 99)
    assert 3 not in clock.steps_at_version  # STEPS_MEMORY versions back: forgotten


def test_the_histogram_is_bounded_and_round_trips():
    h = StalenessHistogram()
    for s in (0, 5, 300, 511, 10**12):
        h[s] += 1
    assert h[256] == 2 and len(h) == 4
    assert StalenessHistogram.from_json(h.as_json()) == h


# ------------------------------------------------------------------ resume.py

def ckpt(**changes):
    meta = {"format": 2, "optimizer": "sgd", "version": 3, "steps": 12, "staleness": {"1": 2}}
    good = {"fingerprint": "fp", "params": np.zeros(N, np.float32), "meta": meta,
            "state": {"velocity": np.zeros(N, np.float32)}}
    return {**good, **changes}


def test_check_checkpoint_refuses_each_bad_field_with_one_line():
    params, meta, histogram = check_checkpoint(ckpt(), "fp", "sgd", N)
    assert meta["version"] == 3 and histogram[1] == 2 and params.dtype == np.float32
    bad_params = np.zeros(N, np.float32)
    bad_params[0] = np.inf
    for changes, message in (({"fingerprint": "other"}, "is for other"), ({"params": np.zeros(N + 1)}, "parameters"),
                             ({"params": bad_params}, "NaN/Inf"),
                             ({"state": {"velocity": np.full(N, np.nan, np.float32)}}, "optimizer state"),
                             ({"meta": {**ckpt()["meta"], "version": -1}}, "'version'"),
                             ({"meta": {**ckpt()["meta"], "optimizer": "adagrad"}}, "server optimizer")):
        with pytest.raises(ValueError, match=message) as e:
            check_checkpoint(ckpt(**changes), "fp", "sgd", N)
        assert "\n" not in str(e.value)


def test_a_failed_write_is_counted_and_the_next_succeeds(tmp_path, monkeypatch):
    saver, said, cond = Checkpointer(tmp_path / "model.npz", every=0.0), [], threading.Condition()
    state = lambda: (np.zeros(N, np.float32), {"velocity": np.zeros(N, np.float32)}, {"format": 2})  # noqa: E731
    assert not saver.due()  # every=0: only when asked
    from minasgd import checkpoint

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save", full)
    assert saver.write("toy", "fp", state, cond, said.append) is None
    assert saver.failures == 1 and "No space left" in saver.error and said == [saver.error]
    monkeypatch.undo()
    assert saver.write("toy", "fp", state, cond, said.append) == tmp_path / "model.npz"
    assert saver.count == 1 and saver.error is None
    assert Checkpointer(None).write("toy", "fp", state, cond, said.append) is None


def test_an_averaging_server_applies_one_nth_of_every_push():
    """--lr-scaling average: the push scale 1/N, with and without the server's momentum; a
    scale outside (0, 1] is refused."""
    assert UpdateRule(N, push_fraction=0.5).scale(batches=4, staleness=3, lr_now=lambda: 9.0) == 0.5
    m = 0.5
    assert UpdateRule(N, momentum=m, push_fraction=0.25).scale(3, 0, lambda: 9.0) == pytest.approx(0.25 * (1 - m**3) / (1 - m))
    both = UpdateRule(N, push_fraction=0.5, staleness_lr=True)
    assert both.scale(batches=2, staleness=2, lr_now=lambda: 9.0) == pytest.approx(0.25)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="push fraction"):
            UpdateRule(N, push_fraction=bad)

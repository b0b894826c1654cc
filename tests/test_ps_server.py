"""ParameterServer rules without sockets: updates, staleness, rejections, sync rounds, checkpoints."""

import threading

import numpy as np
import pytest

from minasgd import checkpoint
from minasgd.optim import learning_rate
from minasgd.ps.server import ParameterServer, Refused

N = 50


def make_ps(**kw):
    kw = {"model_name": "toy", "fingerprint": "toy:50:abc", "total_steps": 1000, "lr": 0.1, "momentum": 0.0, **kw}
    return ParameterServer(np.linspace(-1, 1, N, dtype=np.float32), **kw)


@pytest.mark.task_6_1
def test_async_push_is_applied_at_once_as_the_worker_moved():
    """A push is the displacement the worker moved (its steps at its own lr): the server subtracts
    it as it is, whatever its lr is now, and tells where the schedule stands."""
    ps = make_ps(warmup_steps=10)
    wid = ps.join("toy:50:abc", {"name": "a"})
    out = np.empty(N, np.float32)
    assert ps.fetch_into(wid, out) == (0, False) and np.array_equal(out, ps.params)
    before = ps.params.copy()
    moved = np.full(N, 0.25, np.float32)
    reply = ps.push(wid, moved, base_version=0, batches=4)
    assert np.array_equal(ps.params, before - moved)
    assert reply["version"] == 1 and ps.steps == reply["steps"] == 4
    assert reply["lr"] == pytest.approx(learning_rate(4, 1000, 0.1, 10))
    ps.push(wid, moved, base_version=1, batches=4)  # the lr moved 5x since: the push still moves 0.25
    np.testing.assert_allclose(ps.params, before - 2 * moved, rtol=1e-6)


@pytest.mark.task_6_1
def test_staleness_is_recorded_and_can_scale_the_lr():
    ps = make_ps(staleness_lr=True)
    a, b = ps.join("toy:50:abc", {}), ps.join("toy:50:abc", {})
    grad = np.ones(N, np.float32)
    for _ in range(3):
        ps.push(a, grad, base_version=ps.version)  # fresh: staleness 0
    before = ps.params.copy()
    ps.push(b, grad, base_version=0)  # computed from version 0: 3 mini-batches applied since
    assert ps.stats()["staleness"] == {"0": 3, "3": 1}
    # a push of k = 1 mini-batch, s = 3 stale, moves k / (k + s) = 1/4 as far
    np.testing.assert_allclose(before - ps.params, 1 / 4, rtol=1e-5)
    assert ps.workers[b].last_staleness == 3


def test_staleness_is_counted_in_mini_batches_not_updates():
    ps = make_ps()
    a, b = ps.join("toy:50:abc", {}), ps.join("toy:50:abc", {})
    ps.push(a, np.ones(N, np.float32), base_version=0, batches=4)
    ps.push(b, np.ones(N, np.float32), base_version=0, batches=4)  # one update, 4 mini-batches ago
    assert ps.stats()["staleness"] == {"0": 1, "4": 1}


def test_server_momentum_is_per_mini_batch():
    """The server's momentum m decays by m**k for a push of k mini-batches, scaled (1 - m**k) / (1 - m):
    a pushed step's total effect is 1 / (1 - m) times itself whatever k is, as in single-process training."""
    runs = []
    for k in (1, 4):
        ps = make_ps(momentum=0.75, total_steps=10**9)  # a flat lr
        wid = ps.join("toy:50:abc", {})
        before = ps.params.copy()
        ps.push(wid, np.ones(N, np.float32), base_version=ps.version, batches=k)
        for _ in range(400 // k):  # zero pushes let the momentum play out
            ps.push(wid, np.zeros(N, np.float32), base_version=ps.version, batches=k)
        runs.append(before - ps.params)
    np.testing.assert_allclose(runs[0], 1 / (1 - 0.75), rtol=1e-4)
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-4)
    with pytest.raises(ValueError, match="momentum"):
        make_ps(momentum=1.0)


@pytest.mark.parametrize("grad, version, message", [
    (np.ones(N + 1, np.float32), 0, "float32\\[50\\]"),
    (np.ones(N, np.float64), 0, "float32\\[50\\]"),
    (np.r_[np.ones(N - 1), np.nan].astype(np.float32), 0, "1 NaN/Inf"),
    (np.r_[np.ones(N - 2), np.inf, -np.inf].astype(np.float32), 0, "2 NaN/Inf"),
    (np.ones(N, np.float32), 7, "server is at 0"),
])
@pytest.mark.parametrize("momentum", [0.0, 0.9])  # 0: the default server, which checks only the result
def test_bad_pushes_are_refused_and_params_stay_bit_identical(grad, version, message, momentum):
    ps = make_ps(momentum=momentum)
    wid = ps.join("toy:50:abc", {})
    before = ps.params.tobytes()
    with pytest.raises(Refused, match=message):
        ps.push(wid, grad, base_version=version)
    assert ps.params.tobytes() == before and ps.version == 0 and ps.pushes == 0
    assert not ps.optimizer.velocity.any()


@pytest.mark.parametrize("options, big", [({"momentum": 0.0}, 3e38), ({"momentum": 0.9}, 3e38),
                                           ({"optimizer": "adagrad"}, 1.5e19)])  # Adagrad's sum of squares overflows
def test_huge_finite_pushes_are_applied_and_an_overflowing_one_changes_nothing(options, big):
    ps = make_ps(lr=1e-30, total_steps=10**9, **options)
    wid = ps.join("toy:50:abc", {})
    huge = np.full(N, 1e19, np.float32)  # finite, but the sum of its squares overflows: the quick check says "maybe"
    ps.push(wid, huge, base_version=ps.version)
    assert ps.version == 1 and ps.pushes == 1 and np.isfinite(ps.params).all()

    ps = make_ps(lr=1.0, total_steps=10**9, **options)
    wid = ps.join("toy:50:abc", {})
    ps.push(wid, np.full(N, big, np.float32), base_version=0)  # finite, applied
    before, state = ps.params.tobytes(), {k: v.copy() for k, v in ps.optimizer.state().items()}
    with pytest.raises(Refused, match="the update would make .* NaN/Inf; not applied"):
        ps.push(wid, np.full(N, big, np.float32), base_version=1)  # the sum overflows
    assert ps.params.tobytes() == before and ps.version == 1 and ps.pushes == 1
    assert all(np.array_equal(ps.optimizer.state()[k], v) for k, v in state.items())


def test_unknown_worker_and_wrong_fingerprint_are_refused():
    ps = make_ps()
    with pytest.raises(Refused, match="model mismatch"):
        ps.join("tiny:9:zzz", {})
    with pytest.raises(Refused, match="not connected"):
        ps.push(99, np.ones(N, np.float32), 0)
    wid = ps.join("toy:50:abc", {})
    ps.leave(wid, "bye")
    with pytest.raises(Refused, match="not connected"):
        ps.push(wid, np.ones(N, np.float32), 0)


@pytest.mark.task_6_1
def test_training_ends_after_total_steps_and_later_pushes_are_discarded():
    ps = make_ps(total_steps=8)
    wid = ps.join("toy:50:abc", {})
    assert not ps.push(wid, np.ones(N, np.float32), 0, batches=4)["done"]
    assert ps.push(wid, np.ones(N, np.float32), 1, batches=4)["done"]
    frozen = ps.params.tobytes()
    assert ps.push(wid, np.ones(N, np.float32), 2, batches=4)["done"]
    assert ps.params.tobytes() == frozen and ps.discarded == 1
    with pytest.raises(Refused, match="already finished"):
        ps.join("toy:50:abc", {})


@pytest.mark.task_6_1
def test_adagrad_on_the_server():
    ps = make_ps(optimizer="adagrad")
    wid = ps.join("toy:50:abc", {})
    before = ps.params.copy()
    ps.push(wid, np.full(N, 3.0, np.float32), 0)
    np.testing.assert_allclose(before - ps.params, learning_rate(0, 1000, 0.1), rtol=1e-5)  # g/sqrt(g^2) = 1


def _push_in_thread_with(ps, wid, grad, replies):
    t = threading.Thread(target=lambda: replies.append(ps.push(wid, grad, ps.version)))
    t.start()
    return t


def _push_in_thread(ps, wid, value, replies):
    t = threading.Thread(target=lambda: replies.append(ps.push(wid, np.full(N, value, np.float32), ps.version)))
    t.start()
    return t


def test_sync_round_applies_the_sum_once_everyone_pushed():
    ps = make_ps(sync=True)
    a, b = ps.join("toy:50:abc", {}), ps.join("toy:50:abc", {})
    before, replies = ps.params.copy(), []
    t = _push_in_thread(ps, a, 1.0, replies)
    t.join(timeout=0.3)
    assert t.is_alive() and ps.version == 0  # waiting for b
    ps.push(b, np.full(N, 3.0, np.float32), 0, batches=1)
    t.join(timeout=5)
    assert not t.is_alive() and replies[0]["version"] == 1 and ps.version == 1 and ps.steps == 2
    np.testing.assert_allclose(before - ps.params, 4.0, rtol=1e-5)


def test_a_nan_push_is_refused_in_a_sync_round_and_after_the_end():
    ps = make_ps(sync=True)
    a = ps.join("toy:50:abc", {})
    nan = np.r_[np.ones(N - 1), np.nan].astype(np.float32)
    with pytest.raises(Refused, match="1 NaN/Inf"):  # refused at once: the round's sum stays clean
        ps.push(a, nan, 0)
    assert not ps.round_sum.any() and not ps.round_members and ps.pushes == 0
    ps = make_ps(total_steps=1)
    a = ps.join("toy:50:abc", {})
    ps.push(a, np.ones(N, np.float32), 0)
    with pytest.raises(Refused, match="1 NaN/Inf"):  # training is over, but a bad push is still one
        ps.push(a, nan, 1)
    assert ps.discarded == 0


def test_sync_and_async_take_the_same_step_per_image():
    """A round of N fresh pushes moves the parameters exactly as N fresh async pushes would:
    sync is not N times slower per image (it applied the round's mean before)."""
    pushes = [np.linspace(0, 1, N, dtype=np.float32), np.linspace(1, -2, N, dtype=np.float32)]
    sync, plain = make_ps(sync=True, warmup_steps=0), make_ps(warmup_steps=0, total_steps=10**9)
    a, b = sync.join("toy:50:abc", {}), sync.join("toy:50:abc", {})
    replies = []
    t = _push_in_thread_with(sync, a, pushes[0], replies)
    sync.push(b, pushes[1], 0)
    t.join(timeout=5)
    wid = plain.join("toy:50:abc", {})
    plain.total_steps = sync.total_steps  # same schedule; lr(0) and lr(1) differ by 1e-6
    plain.push(wid, pushes[0] + pushes[1], 0, batches=2)  # the same images in one push
    np.testing.assert_allclose(sync.params, plain.params, rtol=1e-6, atol=1e-7)
    assert sync.steps == plain.steps == 2


def test_sync_round_completes_when_the_missing_worker_leaves():
    ps = make_ps(sync=True)
    a, b = ps.join("toy:50:abc", {}), ps.join("toy:50:abc", {})
    replies = []
    t = _push_in_thread(ps, a, 1.0, replies)
    t.join(timeout=0.2)
    assert t.is_alive()
    ps.leave(b, "connection reset")
    t.join(timeout=5)
    assert not t.is_alive() and ps.version == 1
    assert not ps.stats()["workers"][1]["alive"]


def test_stop_releases_a_waiting_sync_push():
    ps = make_ps(sync=True)
    a, _ = ps.join("toy:50:abc", {}), ps.join("toy:50:abc", {})
    replies = []
    t = _push_in_thread(ps, a, 1.0, replies)
    ps.stop()
    t.join(timeout=5)
    assert not t.is_alive() and replies[0]["done"]


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    ps = make_ps(checkpoint_path=path, checkpoint_every=0.0)
    wid = ps.join("toy:50:abc", {})
    ps.checkpoint()
    first = ps.params.copy()
    ps.push(wid, np.ones(N, np.float32), 0)

    real_savez = np.savez

    def dies_halfway(f, **arrays):  # write part of the file, then "crash"
        real_savez(f, **arrays)
        f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ps.checkpoint()
    monkeypatch.undo()
    ckpt = checkpoint.load(path, expect_fingerprint="toy:50:abc")
    assert ckpt["params"].tobytes() == first.tobytes() and ckpt["meta"]["version"] == 0
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temporary file left behind
    ps.checkpoint()
    assert checkpoint.load(path)["meta"]["version"] == 1


def test_maybe_checkpoint_waits_for_its_interval(tmp_path):
    ps = make_ps(checkpoint_path=tmp_path / "m.npz", checkpoint_every=3600)
    assert ps.maybe_checkpoint() is None and not (tmp_path / "m.npz").exists()
    ps.checkpoint_every = 1e-9
    assert ps.maybe_checkpoint() == tmp_path / "m.npz"


def test_an_averaging_server_moves_by_the_mean_of_the_workers_steps():
    """push_fraction 1/2 (--lr-scaling average with 2 workers): async, each push moves w by half of
    what its worker moved; sync, the round moves w by the mean of the two pushes."""
    ps = make_ps(push_fraction=0.5)
    a, b = ps.join("toy:50:abc", {}), ps.join("toy:50:abc", {})
    before = ps.params.copy()
    ps.push(a, np.full(N, 2.0, np.float32), base_version=0, batches=4)
    ps.push(b, np.full(N, 4.0, np.float32), base_version=0, batches=4)
    np.testing.assert_allclose(before - ps.params, (2.0 + 4.0) / 2)
    assert ps.steps == 8  # the schedule still counts every mini-batch
    ps = make_ps(push_fraction=0.5, sync=True)
    a, b = ps.join("toy:50:abc", {}), ps.join("toy:50:abc", {})
    before, replies = ps.params.copy(), []
    t = _push_in_thread(ps, a, 1.0, replies)
    ps.push(b, np.full(N, 3.0, np.float32), 0, batches=1)
    t.join(timeout=5)
    assert ps.version == 1
    np.testing.assert_allclose(before - ps.params, (1.0 + 3.0) / 2, rtol=1e-5)


def test_run_options_decide_the_push_fraction():
    from minasgd.ps.launcher import PsOptions
    from minasgd.ps.run import push_fraction
    assert push_fraction(PsOptions(workers=4, lr_scaling="average")) == 0.25
    assert push_fraction(PsOptions(workers=4, lr_scaling="none")) == 1.0
    assert push_fraction(PsOptions(workers=4, lr_scaling="sqrt")) == 0.5
    assert push_fraction(PsOptions(workers=4, lr_scaling="average", optimizer="adagrad")) == 1.0


def test_the_start_line_says_what_the_workers_and_the_server_do():
    from minasgd.ps.launcher import PsOptions
    from minasgd.ps.run import update_rule_words
    ps = make_ps(push_fraction=0.5, worker_config={"momentum": 0.9}, lr=0.02)
    assert update_rule_words(ps, PsOptions(workers=2, lr_scaling="average", sync=False)) == (
        "each worker: SGD momentum 0.9, peak lr 0.02; the server applies 1/2 of every push, as each push arrives "
        "(--lr-scaling average, --async)")
    ps = make_ps(push_fraction=1.0, worker_config={"momentum": 0.9}, lr=0.02)
    assert update_rule_words(ps, PsOptions(workers=2)) == (  # the default
        "each worker: SGD momentum 0.9, peak lr 0.02; the server applies every push as it is, in rounds of one "
        "push from every worker (--lr-scaling none, --sync)")
    ps = make_ps(momentum=0.9, worker_config={"momentum": 0.0}, lr=0.02)
    assert "SGD momentum 0, " in update_rule_words(ps, PsOptions(workers=2, lr_scaling="none", momentum_at="server"))
    assert "every push as it is with momentum 0.9" in update_rule_words(ps, PsOptions(workers=2, lr_scaling="none"))


def test_workers_default_to_summed_sync_rounds_of_one_mini_batch_and_async_is_one_flag():
    """The defaults that met the claim on both sets (docs/paper.md): `--workers N` runs rounds of one
    mini-batch of every worker, summed (N times the batch at N times the lr); --async is the paper's mode."""
    from minasgd.cli import build_parser
    from minasgd.cli.train import ps_options

    def opts(*argv):
        return ps_options(build_parser().parse_args(["train", "--workers", "2", *argv]))

    default = opts()
    assert (default.sync, default.nsync, default.lr_scaling, default.momentum_scaling) == (True, 1, "none", "none")
    assert opts("--async").sync is False and opts("--sync").sync is True
    with pytest.raises(SystemExit):
        opts("--sync", "--async")
    serve = build_parser().parse_args(["serve"])
    assert serve.sync is True and serve.nsync == 1

"""The worker's arithmetic, without any network: what it pushes is exactly what it moved (the sum
of its local steps, lr_t * v_t, weight decay included), on every backend, with nfetch and npush
together or apart, and the server applies exactly that, whatever the lr schedule did meanwhile."""

import numpy as np
import pytest

from minasgd import backends
from minasgd.model import Model
from minasgd.optim import learning_rate
from minasgd.ps.server import ParameterServer
from minasgd.ps.worker import Worker
from minasgd.train import prepare_batch


class DirectClient:
    """A worker's client that calls a ParameterServer in this process: no transport at all
    (the same calls an MPI transport would make), recording every push."""

    def __init__(self, ps, fingerprint, stop_after=None):
        self.ps, self.pushes, self.stop_after = ps, [], stop_after
        self.worker_id = ps.join(fingerprint, {"name": "direct"})

    def fetch_into(self, out):
        version, done = self.ps.fetch_into(self.worker_id, out)
        return None if done else version

    def push(self, grad, base_version, batches=1):
        self.pushes.append((np.array(grad, copy=True), base_version, batches))
        reply = self.ps.push(self.worker_id, grad, base_version, batches)
        if self.stop_after is not None and self.ps.steps >= self.stop_after:
            reply["done"] = True  # stop early without changing the lr schedule
        return reply

    def stats(self, numbers=None):
        self.ps.report(self.worker_id, numbers or {})
        return self.ps.stats()

    def close(self, reason="bye"):
        self.ps.leave(self.worker_id, reason)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)


def run_worker(be, npush, nfetch, total_steps, lr=0.05, wd=0.01, batch=8):
    model = Model("micro", be, seed=0)
    ps = ParameterServer(model.get_params(), model_name="micro", fingerprint=model.fingerprint(),
                         total_steps=total_steps, lr=lr, warmup_steps=0, momentum=0.0)
    client = DirectClient(ps, model.fingerprint())
    x, y = images(32)
    worker = Worker(client, model, x, y, batch_size=batch, npush=npush, nfetch=nfetch, schedule=ps.worker_schedule(),
                    weight_decay=wd, seed=3)
    worker.run()
    return ps, client, worker


def replay_first_push(npush, total_steps, lr=0.05, wd=0.01, batch=8):
    """The first push, recomputed by hand: plain SGD steps from the initial parameters, each at
    the schedule's lr for its step, summed as the worker moved them (lr_t * g_t)."""
    be = backends.get("numpy")
    model = Model("micro", be, seed=0)
    x, y = images(32)
    order = np.random.default_rng(3).permutation(32)
    total = np.zeros(model.num_params, np.float32)
    for step in range(npush):
        idx = order[step * batch : (step + 1) * batch]
        xb, yb = prepare_batch(be, model, x[idx], y[idx])
        model.loss_and_grad(xb, yb, step)
        g = model.grads + np.float32(wd) * model.params
        lr_t = np.float32(learning_rate(step, total_steps, lr))
        total += lr_t * g
        model.params -= lr_t * g
    return total


def test_push_is_the_sum_of_the_local_steps():
    ps, client, worker = run_worker(backends.get("numpy"), npush=3, nfetch=3, total_steps=6)
    grad, base, batches = client.pushes[0]
    assert (base, batches) == (0, 3)
    np.testing.assert_allclose(grad, replay_first_push(3, total_steps=6), rtol=1e-4, atol=1e-7)
    assert [p[1] for p in client.pushes] == [0, 1]  # the second sum starts from version 1
    assert worker.steps == 6 and worker.fetches == 2 and ps.done


def test_npush_and_nfetch_apart():
    _, client, worker = run_worker(backends.get("numpy"), npush=1, nfetch=2, total_steps=4)
    assert [p[1:] for p in client.pushes] == [(0, 1), (0, 1), (2, 1), (2, 1)]  # 2 pushes per fetch
    assert worker.fetches == 2
    _, client, worker = run_worker(backends.get("numpy"), npush=4, nfetch=1, total_steps=8)
    assert [p[1:] for p in client.pushes] == [(0, 4), (1, 4)]  # a sum spans 4 fetches; v of its first
    assert worker.fetches == 8


@pytest.mark.gpu
def test_cuda_worker_pushes_what_the_numpy_worker_pushes():
    """The cuda worker accumulates on the device and pushes the same sum. (A simulated step takes
    ~8 s, so this runs on a real GPU only; test_axpy_on_both_backends covers the device sum on the simulator.)"""
    try:
        cuda = backends.get("cuda")
    except ImportError as e:
        pytest.skip(f"cuda backend not available: {e}")
    _, client, _ = run_worker(cuda, npush=2, nfetch=2, total_steps=2, batch=2)
    np.testing.assert_allclose(client.pushes[0][0], replay_first_push(2, total_steps=2, batch=2), rtol=1e-3, atol=1e-6)


def single_process_path(steps, lr, momentum, wd, batch=8, total_steps=None, warmup_steps=0):
    """Single-process training's parameters after `steps` steps (the loop of minasgd.train)."""
    from minasgd.optim import SGD

    be = backends.get("numpy")
    model = Model("micro", be, seed=0)
    opt = SGD(be, model.num_params, momentum, wd)
    x, y = images(32)
    rng, step = np.random.default_rng(3), 0
    while step < steps:
        order = rng.permutation(32)
        for b in range(32 // batch):
            if step == steps:
                break
            idx = order[b * batch : (b + 1) * batch]
            xb, yb = prepare_batch(be, model, x[idx], y[idx])
            model.loss_and_grad(xb, yb, step)
            opt.step(model.params, model.grads, learning_rate(step, total_steps or steps, lr, warmup_steps))
            step += 1
    return model.get_params()


@pytest.mark.parametrize("nsync", [1, 3])
def test_one_worker_follows_single_process_training(nsync):
    """One meaning of --lr and --momentum: a server with one worker takes single-process
    training's steps (momentum 0.9 in the worker, nothing extra on the server), through a
    warm-up and the cosine, to the last bit with nsync 1. Each local step takes the schedule's lr
    at its own step count, so nsync 3 differs only by float32 rounding (the server adds 3 steps
    at once)."""
    be = backends.get("numpy")
    model = Model("micro", be, seed=0)
    ps = ParameterServer(model.get_params(), model_name="micro", fingerprint=model.fingerprint(),
                         total_steps=12, lr=0.05, warmup_steps=4)
    client = DirectClient(ps, model.fingerprint())
    x, y = images(32)
    Worker(client, model, x, y, batch_size=8, npush=nsync, nfetch=nsync, schedule=ps.worker_schedule(),
           momentum=0.9, weight_decay=0.01, seed=3).run()
    expected = single_process_path(12, 0.05, 0.9, 0.01, total_steps=12, warmup_steps=4)
    assert ps.steps == 12
    if nsync == 1:
        assert np.array_equal(ps.params, expected), np.abs(ps.params - expected).max()
    else:
        np.testing.assert_allclose(ps.params, expected, rtol=0, atol=1e-6)


def test_the_server_applies_exactly_what_each_worker_moved_during_the_warm_up():
    """Two workers at nsync 20 inside a 40-step warm-up: B steps from version 0 while A's push
    moves the schedule from step 0 to step 20 (its lr 21x larger). B's push must move the
    server's parameters by what B moved, not by B's steps rescaled to the lr at step 20."""
    be = backends.get("numpy")
    model_a, model_b = Model("micro", be, seed=0), Model("micro", be, seed=1)
    ps = ParameterServer(model_a.get_params(), model_name="micro", fingerprint=model_a.fingerprint(),
                         total_steps=400, lr=0.05, warmup_steps=40, expected_workers=2)
    x, y = images(32)
    workers = []
    for model, seed in ((model_a, 3), (model_b, 4)):
        client = DirectClient(ps, model.fingerprint())
        config = ps.welcome(client.worker_id)
        workers.append(Worker(client, model, x, y, batch_size=8, npush=20, nfetch=20, momentum=0.9,
                              schedule=ps.worker_schedule(), start_step=config["steps"], seed=seed))
    for w in workers:
        assert w.fetch()  # both start from version 0
    for w in workers:  # A's round, then B's (computed from version 0, 20 mini-batches stale)
        batches = w.batches()
        for _ in range(20):
            w.train_step(*next(batches))
        moved = w.host_params - w.model.get_params()
        before = ps.params.copy()
        w.push()
        np.testing.assert_allclose(before - ps.params, moved, rtol=1e-4, atol=1e-7)
    assert ps.steps == 40 and workers[1].pushes == 1


def test_worker_momentum_keeps_the_step_per_gradient_and_the_delay():
    from minasgd.ps.launcher import worker_momentum

    assert worker_momentum(0.9, 1, 4) == (0.9, 1.0)  # one worker: exactly the trainer's SGD
    for scaling in ("staleness", "workers", "none"):
        for workers, nsync in [(2, 1), (2, 4), (4, 1), (8, 16)]:
            m_w, factor = worker_momentum(0.9, workers, nsync, scaling)
            assert 0.0 <= m_w <= 0.9
            assert 0.02 * factor / (1 - m_w) == pytest.approx(0.02 / (1 - 0.9))  # total step per gradient
    assert worker_momentum(0.9, 2, 4, "workers")[0] == pytest.approx(0.81)  # decays once per N mini-batches
    # staleness (N - 1) x nsync = 4 mini-batches leaves 10 - 4 = 6 for momentum: (1 - 1/6)**2
    assert worker_momentum(0.9, 2, 4, "staleness")[0] == pytest.approx((5 / 6) ** 2)
    assert worker_momentum(0.9, 2, 16, "staleness")[0] == 0.0  # staleness alone is longer than the delay


def test_worker_settings_say_what_lr_and_momentum_mean_with_workers():
    from minasgd.ps.launcher import PsOptions
    from minasgd.ps.run import worker_settings

    m, scale = worker_settings(0.9, PsOptions(workers=2, nsync=4, sync=False, lr_scaling="workers",
                                              momentum_scaling="staleness"))
    assert m == pytest.approx((5 / 6) ** 2) and scale == pytest.approx((1 - m) / 0.1 / 2)  # staleness, lr / N
    m, scale = worker_settings(0.9, PsOptions(workers=2, nsync=1, sync=False, momentum_scaling="staleness"))  # staleness 1
    assert m == pytest.approx((8 / 9) ** 2) and scale == pytest.approx((1 - m) / 0.1)
    # the defaults: each worker steps as one process (the server sums a round's pushes: `push_fraction`)
    assert worker_settings(0.9, PsOptions(workers=2)) == (0.9, 1.0)
    m, scale = worker_settings(0.9, PsOptions(workers=2, nsync=4, sync=True, lr_scaling="none",
                                              momentum_scaling="staleness"))
    assert m == pytest.approx(0.81) and scale == pytest.approx(1.9)  # a sync round is not stale: m**N
    assert worker_settings(0.9, PsOptions(workers=2, momentum_at="server", lr_scaling="none")) == (0.0, 1.0)
    assert worker_settings(0.9, PsOptions(workers=4, optimizer="adagrad")) == (0.0, 1.0)
    assert worker_settings(0.9, PsOptions(workers=1, nsync=300)) == (0.9, 1.0)  # one worker: one process

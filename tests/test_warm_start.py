"""The paper's warm start: a snapshot taken mid-schedule (`--stop-at`), continued in the same
lr schedule (`--init ... --continue-schedule`) by one process or by workers."""

import json

import numpy as np
import pytest

from minasgd.data import Dataset
from minasgd.optim import learning_rate
from minasgd.train import TrainConfig, train


def colours(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = np.zeros((n, 32, 32, 3), np.uint8)
    x[..., 0] = (y * 25)[:, None, None]
    x += rng.integers(0, 20, x.shape, dtype=np.uint8)
    return x, y


@pytest.fixture(scope="module")
def dataset():
    (x, y), (tx, ty) = colours(160, 1), colours(40, 2)
    return Dataset("colours", [f"c{i}" for i in range(10)], x, y, tx, ty)


def cfg(tmp_path, name, **kw):
    return TrainConfig(model="micro", backend="numpy", epochs=3, batch_size=16, lr=0.05, warmup_steps=8,
                       log_every=1, quiet=True, out=str(tmp_path / name), **kw)


def steps_and_lrs(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["lr"]) for r in records if r["kind"] == "step"]


def run(config, dataset, monkeypatch):
    monkeypatch.setattr("minasgd.train.load_dataset", lambda cfg, progress=None: dataset)
    return train(config)


def test_a_snapshot_mid_schedule_continues_in_the_same_schedule(tmp_path, dataset, monkeypatch):
    """Stopped at step 12 of a 30-step schedule, then continued: the continued run takes steps
    13..30 at exactly the lr an uninterrupted run takes them at, and counts only its own images."""
    whole = run(cfg(tmp_path, "whole"), dataset, monkeypatch)
    snapshot = run(cfg(tmp_path, "snap", stop_step=12), dataset, monkeypatch)
    assert whole["steps"] == 30 and snapshot["steps"] == 12
    assert steps_and_lrs(tmp_path / "snap") == steps_and_lrs(tmp_path / "whole")[:12]  # the schedule was not shortened
    rest = run(cfg(tmp_path, "rest", init=str(tmp_path / "snap" / "model.npz"), continue_schedule=True),
               dataset, monkeypatch)
    assert rest["steps"] == 30 and rest["images"] == 18 * 16
    assert steps_and_lrs(tmp_path / "rest") == steps_and_lrs(tmp_path / "whole")[12:]
    fresh = run(cfg(tmp_path, "fresh", init=str(tmp_path / "snap" / "model.npz")), dataset, monkeypatch)
    assert steps_and_lrs(tmp_path / "fresh")[0] == (1, learning_rate(0, 30, 0.05, 8))  # --init alone: a new warm-up


def test_continue_schedule_needs_a_checkpoint_and_something_left(tmp_path, dataset, monkeypatch):
    with pytest.raises(ValueError, match="needs --init"):
        run(cfg(tmp_path, "a", continue_schedule=True), dataset, monkeypatch)
    run(cfg(tmp_path, "done"), dataset, monkeypatch)
    with pytest.raises(ValueError, match="nothing to train"):
        run(cfg(tmp_path, "b", init=str(tmp_path / "done" / "model.npz"), continue_schedule=True), dataset, monkeypatch)


def test_workers_continue_the_schedule_too(tmp_path, dataset, monkeypatch):
    """The server begins at the snapshot's step: its lr, the workers' schedule position and the
    run's end are those of the uninterrupted run; images count from the snapshot."""
    from minasgd.ps.launcher import PsOptions, train_distributed

    run(cfg(tmp_path, "snap", stop_step=12), dataset, monkeypatch)
    summary = train_distributed(cfg(tmp_path, "rest", init=str(tmp_path / "snap" / "model.npz"), continue_schedule=True),
                                PsOptions(workers=1, nsync=2), dataset=dataset)
    assert summary["steps"] == 30 and summary["images"] == 18 * 16
    assert summary["version"] == 9  # 18 mini-batches in pushes of 2: the server began at step 12
    records = [json.loads(line) for line in (tmp_path / "rest" / "metrics.jsonl").read_text().splitlines()]
    first_eval = next(r for r in records if r["kind"] == "epoch")
    assert first_eval["step"] == 20 and first_eval["images"] == 8 * 16  # epoch 2 ends at step 20
    with pytest.raises(ValueError, match="--stop-at is for one process"):
        train_distributed(cfg(tmp_path, "x", stop_step=5), PsOptions(workers=1), dataset=dataset)


def test_training_error_is_measured_beside_test_error(tmp_path, dataset, monkeypatch):
    """--eval-train N: each evaluation also measures the first N training images (no dropout), in
    one process and on the server, so a report can show training error as the paper does."""
    from minasgd import backends, checkpoint
    from minasgd.model import Model
    from minasgd.ps.launcher import PsOptions, train_distributed
    from minasgd.train import evaluate

    run(cfg(tmp_path, "one", eval_train=32), dataset, monkeypatch)
    train_distributed(cfg(tmp_path, "two", eval_train=32), PsOptions(workers=1, nsync=2), dataset=dataset)
    for name in ("one", "two"):
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if r["kind"] == "epoch"]
        assert len(evals) == 3 and all(0 <= e["train_accuracy"] <= 1 and e["train_loss"] > 0 for e in evals)
        model = Model("micro", backends.get("numpy"))
        model.set_params(checkpoint.load(tmp_path / name / "model.npz")["params"])
        assert evals[-1]["train_accuracy"] == evaluate(model, dataset.train_x[:32], dataset.train_y[:32])[0]


def test_one_process_builds_its_model_with_build_model(tmp_path, dataset, monkeypatch):
    """`train.build_model` is the one place a model is built and warm-started (the workers'
    server uses it too), and a warm start is told as the same event on both paths."""
    import minasgd.train as train_module

    snapshot = run(cfg(tmp_path, "snap", stop_step=4), dataset, monkeypatch)
    built, real = [], train_module.build_model
    monkeypatch.setattr(train_module, "build_model", lambda *a: built.append(a[0].init) or real(*a))
    events = []
    monkeypatch.setattr("minasgd.train.load_dataset", lambda cfg, progress=None: dataset)
    config = cfg(tmp_path, "warm", init=str(tmp_path / "snap" / "model.npz"), stop_step=2)
    train(config, on_event=events.append)
    assert built == [config.init] and snapshot["steps"] == 4
    assert [e for e in events if e["kind"] == "warm_start"] == [{"kind": "warm_start", "init": config.init, "steps": 4}]

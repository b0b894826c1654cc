"""The BLAS thread rule for training processes (minasgd.threads) and the step benchmark's numbers."""

import os

import numpy as np
import pytest

from minasgd import backends, bench_step, threads
from minasgd.model import Model


def test_one_thread_unless_the_environment_names_a_count():
    assert threads.chosen_blas_threads({})[0] == 1
    assert threads.chosen_blas_threads({"OMP_NUM_THREADS": "3"}) == (3, "from OMP_NUM_THREADS")
    assert threads.chosen_blas_threads({"OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "3"})[0] == 2
    with pytest.raises(ValueError, match="OPENBLAS_NUM_THREADS"):
        threads.chosen_blas_threads({"OPENBLAS_NUM_THREADS": "many"})


def test_training_block_sets_the_count_and_puts_it_back():
    before = threads.blas_threads()
    with threads.blas_threads_for_training({}) as line:
        assert threads.blas_threads() == 1
        assert line.startswith("BLAS threads: 1 (")
    assert threads.blas_threads() == before


def test_step_flops_counts_forward_and_both_gradients():
    model = Model("micro", backends.get("numpy"))
    fwd = model.flops_per_image()
    first = model.layers[0].flops()
    assert bench_step.step_flops(model, 4) == 4 * (3 * fwd - first)


def test_bench_step_gives_a_row_per_thread_setting():
    result = bench_step.measure("numpy", "micro", batch_size=4, repeats=1, peak_size=64)
    assert [row["threads"] for row in result["rows"]] == ["1 each", "default"]
    assert result["rows"][0]["blas_threads"] == 1
    assert all(row["ours_seconds"] > 0 and np.isfinite(row["ours_gflops"]) for row in result["rows"])
    assert all(row["blas_peak_gflops"] > 0 for row in result["rows"])


def test_bench_step_table_gives_each_side_as_a_share_of_the_blas_peak():
    from rich.console import Console

    from minasgd.dashboard import show_bench_step

    row = {"threads": "1 each", "blas_threads": 1, "ours_seconds": 0.2, "ours_cpu_seconds": 0.2, "ours_gflops": 60.0,
           "blas_peak_gflops": 80.0, "torch_seconds": 0.16, "torch_cpu_seconds": 0.16, "torch_gflops": 75.0,
           "torch_device": "cpu", "torch_threads": 1, "ratio_ours_over_torch": 1.25, "cpu_ratio_ours_over_torch": 1.25}
    result = {"backend": "numpy", "device": "CPU", "model": "alexnet-mini", "batch_size": 128, "step_gflop": 13.1,
              "first_step_seconds": 1.0, "rows": [row]}
    console = Console(record=True, width=200)
    show_bench_step(result, console)
    text = console.export_text()
    assert "of BLAS peak" in text and "75%" in text and "94%" in text and "1 each: 80" in text


def test_single_process_training_runs_on_one_blas_thread_and_says_so(tmp_path, monkeypatch):
    from minasgd import train as train_module

    for name in threads.ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    seen = []
    real_lr = train_module.learning_rate
    monkeypatch.setattr(train_module, "learning_rate", lambda *a: (seen.append(threads.blas_threads()), real_lr(*a))[1])
    before = threads.blas_threads()
    events = []
    cfg = train_module.TrainConfig(dataset="shapes:64,16", data_root=str(tmp_path), model="micro", epochs=1,
                                   batch_size=16, out=str(tmp_path / "run"))
    train_module.train(cfg, on_event=events.append)
    assert seen and set(seen) == {1}
    said = [e["text"] for e in events if e["kind"] == "threads"]
    assert len(said) == 1 and said[0].startswith("BLAS threads: 1 (one per training process")
    assert threads.blas_threads() == before


class _Stop(Exception):
    pass


def test_every_worker_trains_on_one_blas_thread(monkeypatch):
    """On any transport (local processes, `minasgd work`, MPI ranks): all go through connect_and_train."""
    from minasgd.ps import worker as worker_module

    for name in threads.ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    seen = []

    class RecordingWorker:
        def __init__(self, *args, **kwargs):
            pass

        def run(self):
            seen.append(threads.blas_threads())
            return {}

    class Client:
        server_hello = {"model": "micro"}

        def hello(self, fingerprint, info, num_params):
            return {"worker_id": 1, "nsync": 1, "batch_size": 4, "lr": 0.1,
                    "schedule": {"base_lr": 0.1, "total_steps": 10, "warmup_steps": 0}}

        def close(self, why):
            self.why = why

    monkeypatch.setattr(worker_module, "Worker", RecordingWorker)
    with threads.limit_blas_threads(2):
        worker_module.connect_and_train(Client(), shard=(np.zeros((4, 3, 8, 8), np.float32), np.zeros(4, np.int32)))
        assert threads.blas_threads() == 2  # put back afterwards
    assert seen == [1]


def test_the_parameter_server_runs_on_one_blas_thread(tmp_path, monkeypatch):
    from minasgd.ps import launcher
    from minasgd.train import TrainConfig

    for name in threads.ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    seen = []

    def watch(*args, **kwargs):
        seen.append(threads.blas_threads())
        raise _Stop

    monkeypatch.setattr(launcher, "watch", watch)
    cfg = TrainConfig(dataset="shapes:64,16", data_root=str(tmp_path), model="micro", epochs=1, batch_size=16,
                      out=str(tmp_path / "run"))
    with threads.limit_blas_threads(2):
        with pytest.raises(_Stop):
            launcher.run_server(cfg, launcher.PsOptions(), local_workers=0)
        assert threads.blas_threads() == 2
    assert seen == [1]


def test_blas_threads_for_children_sets_every_variable_and_puts_them_back(monkeypatch):
    """One list of variables (threads.ENV_NAMES) for the rule and for the processes we start."""
    monkeypatch.setenv(threads.ENV_NAMES[0], "7")
    for name in threads.ENV_NAMES[1:]:
        monkeypatch.delenv(name, raising=False)
    with threads.blas_threads_for_children(3):
        assert {name: os.environ.get(name) for name in threads.ENV_NAMES} == dict.fromkeys(threads.ENV_NAMES, "3")
    assert os.environ[threads.ENV_NAMES[0]] == "7"
    assert all(name not in os.environ for name in threads.ENV_NAMES[1:])
    from minasgd.ps import launcher
    assert not hasattr(launcher, "blas_threads")  # its old name, which shadowed threads.blas_threads

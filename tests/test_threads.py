"""The thread rules for training processes (minasgd.threads) and the step benchmark's numbers."""

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
    assert [row["threads"] for row in result["scaling"]] == list(range(1, threads.cores() + 1))
    assert min(row["ours_over_best"] for row in result["scaling"]) == 1.0
    assert result["load_before"] >= 0 and result["cores"] == threads.cores()


def test_bench_step_scaling_runs_our_threads_at_each_count_and_blas_on_one(monkeypatch):
    """Our step as `minasgd train` runs it (n threads of ours, BLAS on one); the BLAS peak, the
    yardstick, at n BLAS threads."""
    from minasgd.backends import cpu_loops

    monkeypatch.setattr(bench_step, "cores", lambda: 2)
    seen = []
    monkeypatch.setattr(bench_step, "_median_times", lambda steps, repeats: (
        seen.append((threads.blas_threads(), cpu_loops.threads())), {"ours": (0.1 * len(seen), 0.1)})[1])
    monkeypatch.setattr(bench_step, "blas_peak_gflops", lambda size: 10.0 * threads.blas_threads())
    rows = bench_step._scaling(None, None, None, None, None, 1, 1e9, 64)
    assert seen == [(1, 1), (1, 2)] and cpu_loops.threads() == 1
    assert [(r["threads"], round(r["ours_over_best"], 6)) for r in rows] == [(1, 1.0), (2, 2.0)]
    assert [round(r["ours_of_peak"], 6) for r in rows] == [1.0, 0.25]  # 10 GFLOP/s of 10, 5 of 20


def test_bench_step_scaling_table_and_docs_region(tmp_path):
    from rich.console import Console

    from minasgd.cli.bench import write_between_markers
    from minasgd.dashboard import show_bench_step

    result = {"backend": "numpy", "device": "CPU", "model": "micro", "batch_size": 16, "step_gflop": 0.1,
              "first_step_seconds": 1.0, "rows": [], "cores": 2, "load_before": 0.3, "load_after": 0.5,
              "scaling": [{"threads": 1, "ours_seconds": 0.3, "ours_over_best": 1.5, "blas_peak_gflops": 40.0,
                           "ours_of_peak": 0.25},
                          {"threads": 2, "ours_seconds": 0.2, "ours_over_best": 1.0, "blas_peak_gflops": 70.0,
                           "ours_of_peak": 0.125}]}
    console = Console(record=True, width=200)
    show_bench_step(result, console)
    text = console.export_text()
    assert "1.50x" in text and "300.0" in text and "25%" in text and "PyTorch baseline unavailable" in text
    md = bench_step.scaling_markdown(result)
    assert "| 2 | 70 | 200.0 | 1.00x | 12% |" in md and "load average 0.3 before, 0.5 after" in md
    doc = tmp_path / "cpu.md"
    doc.write_text("intro\n<!-- bench step scaling -->\nold table\n<!-- end -->\noutro\n")
    write_between_markers(doc, md)
    assert doc.read_text() == f"intro\n<!-- bench step scaling -->\n{md}<!-- end -->\noutro\n"
    doc.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs a line"):
        write_between_markers(doc, md)


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


def _blas_pools():
    from threadpoolctl import threadpool_info

    return {pool["filepath"]: pool["num_threads"] for pool in threadpool_info() if pool.get("user_api") == "blas"}


def _train_and_watch(tmp_path, monkeypatch, n_cores, load, **cfg_extra):
    """Train `micro` for one short epoch on a pretend machine; (the thread line said, the
    (BLAS, loop) thread counts seen at each step)."""
    from minasgd import train as train_module
    from minasgd.backends import cpu_loops

    for name in (threads.THREADS_ENV, *threads.ENV_NAMES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "cores", lambda: n_cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    seen = []
    real_lr = train_module.learning_rate
    monkeypatch.setattr(train_module, "learning_rate",
                        lambda *a: (seen.append((threads.blas_threads(), cpu_loops.threads())), real_lr(*a))[1])
    before = _blas_pools(), cpu_loops.threads()
    events = []
    cfg = train_module.TrainConfig(dataset="shapes:64,16", data_root=str(tmp_path), model="micro", epochs=1,
                                   batch_size=16, out=str(tmp_path / "run"), **cfg_extra)
    train_module.train(cfg, on_event=events.append)
    # Put back afterwards (in every BLAS loaded before: one loaded meanwhile starts at its own default).
    assert ({k: v for k, v in _blas_pools().items() if k in before[0]}, cpu_loops.threads()) == before
    said = [e["text"] for e in events if e["kind"] == "threads"]
    assert len(said) == 1
    return said[0], set(seen)


@pytest.mark.parametrize("ms_on_two, want", [(5.0, 2), (30.0, 1)])
def test_single_process_training_on_an_idle_machine_measures_its_cores_and_says_so(tmp_path, monkeypatch,
                                                                                  ms_on_two, want):
    """2 idle cores: 1 and 2 threads are timed at start (here: a pretend measurement) and the
    faster one trains."""
    measured = []
    monkeypatch.setattr(threads, "measured_at_start", lambda step, n: measured.append(n) or {1: 10.0, n: ms_on_two})
    said, seen = _train_and_watch(tmp_path, monkeypatch, n_cores=2, load=0.1)
    assert measured == [2] and seen == {(1, want)}, seen
    assert said.startswith(f"threads: {want} (2 cores given, load 0.1 leaves 1.9 idle")
    assert f"a step took 10 ms on 1 thread and {ms_on_two:.0f} ms on 2" in said


def test_single_process_training_on_a_busy_machine_keeps_to_one_thread(tmp_path, monkeypatch):
    said, seen = _train_and_watch(tmp_path, monkeypatch, n_cores=2, load=1.2)
    assert seen == {(1, 1)}
    assert said.startswith("threads: 1 (2 cores given, load 1.2 leaves 0.8 idle")


def test_threads_flag_overrides_the_load(tmp_path, monkeypatch):
    said, seen = _train_and_watch(tmp_path, monkeypatch, n_cores=2, load=0.0, threads=1)
    assert seen == {(1, 1)} and said == "threads: 1 (from --threads)"


@pytest.mark.parametrize("n_cores, load, want", [(8, 0.3, 8), (8, 2.6, 5), (8, 7.6, 1), (8, 40.0, 1),
                                                 (2, 0.4, 2), (2, 0.6, 1), (1, 0.0, 1)])
def test_one_process_gets_the_idle_cores_it_is_given(n_cores, load, want):
    assert threads.chosen_threads_for_one_process(environ={}, n_cores=n_cores, load=load)[0] == want


def test_one_process_thread_count_from_the_environment_or_the_flag():
    choose = threads.chosen_threads_for_one_process
    assert choose(environ={"MINASGD_THREADS": "3", "OPENBLAS_NUM_THREADS": "1"}, n_cores=8, load=0) == (3, "from MINASGD_THREADS")
    assert choose(environ={"OMP_NUM_THREADS": "2"}, n_cores=8, load=0) == (2, "from OMP_NUM_THREADS")
    assert choose(4, environ={"MINASGD_THREADS": "3"}) == (4, "from --threads")
    for bad in ({"MINASGD_THREADS": "all"}, {"MINASGD_THREADS": "0"}):
        with pytest.raises(ValueError, match="MINASGD_THREADS"):
            choose(environ=bad)
    with pytest.raises(ValueError, match="--threads 0"):
        choose(0)


def test_cores_are_the_affinity_not_the_machine(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert threads.cores() == 1


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


def test_train_refuses_zero_threads_in_one_line(tmp_path, capsys):
    from minasgd.cli import main

    assert main(["train", "--workers", "0", "--threads", "0", "--model", "micro", "--quiet",
                 "--out", str(tmp_path / "run"), "--data-root", str(tmp_path)]) == 2
    said = capsys.readouterr()
    assert "minasgd train: --threads 0: expected 1 or more" in said.out + said.err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("faster", [1, 2])
def test_more_threads_are_kept_only_when_measured_faster_at_start(faster):
    """The start-up measurement decides: a step that is slower on 2 threads runs on 1 (as on the
    2-core machine of docs/cpu.md, even idle), one that is faster keeps 2."""
    import time as clock

    from minasgd.backends import cpu_loops

    calls = []

    def step():
        calls.append(cpu_loops.threads())
        clock.sleep(0.002 if cpu_loops.threads() == faster else 0.02)

    with threads.limit_blas_threads(2):
        with threads.threads_for_one_process(environ={}, n_cores=2, load=0.0, make_step=lambda: step) as line:
            assert cpu_loops.threads() == faster and threads.blas_threads() == 1  # our threads split the products
            assert line.startswith(f"threads: {faster} (") and "measured at start" in line
        assert threads.blas_threads() == 2
    assert sorted(set(calls)) == [1, 2]


def test_a_thread_count_the_user_chose_is_not_second_guessed():
    calls = []
    with threads.threads_for_one_process(requested=2, environ={}, n_cores=2, load=0.0,
                                         make_step=lambda: calls.append(1)) as line:
        assert line.startswith("threads: 2 (from --threads")
    assert calls == []

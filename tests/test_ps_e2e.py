"""The parameter server end to end, with real worker processes on 127.0.0.1: async and sync
training, a worker killed mid-run, Ctrl-C, `serve` + `work`, and the one-line errors.

The dataset is tiny and easy (each class is a colour) and the model is `micro`, so every run
takes seconds; every wait has a timeout.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from minasgd import backends, checkpoint
from minasgd.cli import main
from minasgd.data import Dataset
from minasgd.model import Model
from minasgd.ps.launcher import PsOptions, start_server, start_workers, stop_workers, train_distributed
from minasgd.ps.tcp import listen
from minasgd.rundir import RunDir
from minasgd.train import TrainConfig, evaluate
from colours import CLASSES, colour_images


@pytest.fixture(scope="module")
def dataset():
    train_x, train_y = colour_images(1200, 1)
    test_x, test_y = colour_images(200, 2)
    return Dataset("colours", CLASSES, train_x, train_y, test_x, test_y)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, dataset):
    """The same kind of data as an image folder, for the command-line tests."""
    root = tmp_path_factory.mktemp("colours")
    for split, (xs, ys) in {"train": (dataset.train_x[:400], dataset.train_y[:400]),
                            "test": (dataset.test_x[:100], dataset.test_y[:100])}.items():
        for i, (x, y) in enumerate(zip(xs, ys)):
            (root / split / CLASSES[y]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(root / split / CLASSES[y] / f"{i}.png")
    return root


def config(tmp_path, **kw):
    return TrainConfig(**{"model": "micro", "backend": "numpy", "epochs": 4, "batch_size": 16, "lr": 0.02,
                          "warmup_steps": 0, "out": str(tmp_path / "run"), "quiet": True, **kw})


def initial_loss(dataset):
    return evaluate(Model("micro", backends.get("numpy"), seed=0), dataset.test_x, dataset.test_y)[1]


@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_train_with_workers_learns_and_writes_the_run(tmp_path, dataset, sync):
    summary = train_distributed(config(tmp_path), PsOptions(workers=2, nsync=2, sync=sync), dataset=dataset)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"metrics.jsonl", "model.npz", "summary.json"}
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("pushes", "fetches", "rejected", "staleness", "workers", "nsync", "mode", "test_accuracy"):
        assert key in on_disk
    assert on_disk["workers"] == 2 and on_disk["nsync"] == 2 and on_disk["mode"] == ("sync" if sync else "async")
    assert summary["rejected"] == 0 and summary["pushes"] >= 20
    assert summary["steps"] >= 4 * (1200 // 16) and summary["test_loss"] < initial_loss(dataset) - 0.5
    assert summary["test_accuracy"] > 0.4
    assert all(w["left"] in ("finished", "training finished") for w in summary["worker_stats"])
    if sync:
        assert summary["staleness"] == {"0": summary["pushes"]}
    kinds = {json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"epoch", "server"} <= kinds
    ckpt = checkpoint.load(run / "model.npz", expect_fingerprint=Model("micro", backends.get("numpy")).fingerprint())
    assert ckpt["meta"]["steps"] == summary["steps"]


def test_a_worker_killed_mid_run_is_dropped_and_the_others_finish(tmp_path, dataset):
    cfg = config(tmp_path, epochs=40)
    opts = PsOptions(workers=3, nsync=2, timeout=20)
    model = Model("micro", backends.get("numpy"))
    ps, tcp = start_server(cfg, opts, model, len(dataset.train_y), RunDir(cfg.out), listen("127.0.0.1", 0))
    shards = [dataset.shard(i, 3) for i in range(3)]
    processes = start_workers(tcp.address, None, shards, "numpy", [None] * 3, opts)
    try:
        deadline = time.monotonic() + 30
        while len(ps.workers) < 3 or min(w.pushes for w in ps.workers.values()) < 5:
            assert time.monotonic() < deadline, "workers did not start pushing"
            time.sleep(0.02)
        victim = processes[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=10)
        steps_at_kill = ps.steps
        deadline = time.monotonic() + 60
        while not ps.done:
            assert time.monotonic() < deadline, "training did not finish without the killed worker"
            time.sleep(0.05)
        stop_workers(processes, grace=15)
    finally:
        ps.stop()
        stop_workers(processes, grace=1)
        tcp.close()
    assert victim.exitcode == -signal.SIGKILL
    assert [p.exitcode for p in processes[1:]] == [0, 0]
    states = {w.name: w for w in ps.workers.values()}
    killed = states[f"pid {victim.pid}"]
    assert killed.left and "finished" not in killed.left  # dropped: connection reset / closed
    assert sum(w.left in ("finished", "training finished") for w in states.values()) == 2
    assert ps.steps > steps_at_kill and ps.rejected == 0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _minasgd(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "minasgd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_serve_and_work_from_the_command_line(tmp_path, folder):
    port = _free_port()
    common = ["--dataset", f"folder:{folder}", "--model", "micro", "--backend", "numpy"]
    server = _minasgd("serve", "--bind", f"127.0.0.1:{port}", "--token", "t0k", "--workers", "2", *common,
                      "--epochs", "8", "--batch-size", "16", "--lr", "0.02",
                      "--out", str(tmp_path / "served"), "--quiet")
    workers = [_minasgd("work", "--server", f"127.0.0.1:{port}", "--token", "t0k", "--backend", "numpy",
                        "--shard", f"{i}/2") for i in (1, 2)]
    try:
        outputs = [p.communicate(timeout=60)[0] for p in workers]
        server_output = server.communicate(timeout=30)[0]
    finally:
        for p in [server, *workers]:
            p.kill()
    assert server.returncode == 0, server_output
    assert all(p.returncode == 0 for p in workers), outputs
    assert all("training over" in out for out in outputs)
    summary = json.loads((tmp_path / "served" / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["test_accuracy"] > 0.3


def test_ctrl_c_checkpoints_and_stops_every_process(tmp_path, folder):
    out = tmp_path / "run"
    proc = _minasgd("train", "--workers", "2", "--dataset", f"folder:{folder}", "--model", "micro",
                    "--backend", "numpy", "--epochs", "100000", "--batch-size", "16", "--out", str(out),
                    "--quiet", start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not any(json.loads(line).get("step", 0) > 0 for line in  # a record after the first update
                      ((out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else "").splitlines()):
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C: the whole group
        output = proc.communicate(timeout=30)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    assert checkpoint.load(out / "model.npz")["meta"]["steps"] > 0
    deadline = time.monotonic() + 10
    while True:  # no process of the group is left (the helpers exit once the parent has gone)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the run are still alive"
        time.sleep(0.1)


def test_busy_port_and_public_bind_are_one_line_errors(capsys):
    taken = listen("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--bind", f"127.0.0.1:{port}"]) == 2
        assert f"minasgd serve: cannot listen on 127.0.0.1:{port}: address already in use" in capsys.readouterr().out
    finally:
        taken.close()
    assert main(["train", "--workers", "2", "--bind", "0.0.0.0:0"]) == 2
    assert "refusing to listen on 0.0.0.0 without --token" in capsys.readouterr().out


def test_work_without_a_server_is_one_line(capsys):
    port = _free_port()
    assert main(["work", "--server", f"127.0.0.1:{port}", "--connect-timeout", "0.5"]) == 2
    assert f"cannot connect to 127.0.0.1:{port}" in capsys.readouterr().out


def test_bench_goodput_measures_ours_and_raw():
    from minasgd.ps.bench import goodput

    result = goodput(2000, seconds=0.05)
    assert set(result) == {"push", "fetch", "push+fetch"}
    assert all(r["ours"] > 0 and r["raw"] > 0 for r in result.values())


def test_one_worker_at_nsync_1_repeats_single_process_training_bit_for_bit(tmp_path, dataset, monkeypatch):
    """One meaning of --lr and --momentum, end to end: a server and one worker process over TCP,
    nsync 1, end with exactly the parameters of single-process training (same seed and flags)."""
    from minasgd import train as train_module

    small = Dataset("colours", CLASSES, dataset.train_x[:256], dataset.train_y[:256],
                    dataset.test_x[:64], dataset.test_y[:64])
    monkeypatch.setattr(train_module, "load_dataset", lambda cfg, progress=None: small)

    def cfg(name):
        return TrainConfig(model="micro", backend="numpy", epochs=2, batch_size=16, lr=0.02, momentum=0.9,
                           seed=3, quiet=True, out=str(tmp_path / name))

    one = train_module.train(cfg("single"))
    dist = train_distributed(cfg("server"), PsOptions(workers=1, nsync=1, checkpoint_every=1e9), dataset=small)
    single_params = checkpoint.load(tmp_path / "single" / "model.npz")["params"]
    server_params = checkpoint.load(tmp_path / "server" / "model.npz")["params"]
    assert np.array_equal(single_params, server_params), np.abs(single_params - server_params).max()
    assert dist["test_accuracy"] == one["test_accuracy"] and dist["steps"] == one["steps"]

"""The `minasgd` command line end to end, on tiny settings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minasgd import checkpoint
from minasgd.cli import main

TINY_DATA = "shapes:256,64"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def run_cli(*args):
    return main([str(a) for a in args])


def test_model_json(capsys):
    assert run_cli("model", "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "alexnet-mini" and info["num_params"] == 425_290
    assert {"name", "type", "in_shape", "out_shape"} <= set(info["layers"][0])
    assert info["layers"][0]["kernel"] == 5 and info["layers"][0]["pad"] == 2


def test_model_table(capsys):
    assert run_cli("model", "tiny") == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "parameters" in out


def test_train_writes_the_run_files_and_eval_reads_them(tmp_path, data_root, capsys):
    out = tmp_path / "run"
    code = run_cli("train", "--workers", 0, "--dataset", TINY_DATA, "--data-root", data_root, "--model", "tiny",
                   "--backend", "numpy", "--epochs", 2, "--batch-size", 32, "--log-every", 2, "--out", out, "--quiet")
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "epochs", "steps", "wall_seconds", "images_per_second"):
        assert key in summary
    assert summary["epochs"] == 2 and summary["steps"] == 2 * (256 // 32)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"step", "epoch"}
    assert sum(r["kind"] == "epoch" for r in records) == 2
    ckpt = checkpoint.load(out / "model.npz")
    assert ckpt["model"] == "tiny" and ckpt["params"].dtype == np.float32

    capsys.readouterr()
    assert run_cli("eval", out / "model.npz", "--dataset", TINY_DATA, "--data-root", data_root, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_accuracy"] == pytest.approx(summary["test_accuracy"])

    # warm start from the saved model, then stop after a few steps
    warm = tmp_path / "warm"
    assert run_cli("train", "--workers", 0, "--dataset", TINY_DATA, "--data-root", data_root, "--model", "tiny",
                   "--backend", "numpy", "--init", out / "model.npz", "--max-steps", 3, "--out", warm, "--quiet") == 0
    assert json.loads((warm / "summary.json").read_text())["steps"] == 3


def test_train_on_the_cuda_backend_writes_the_same_files(tmp_path, data_root):
    """The simulator is slow, so: the 8x8 `micro` net, one step, two test images (each image of the
    evaluation is a 64-pixel slab of the tiled kernels' 16 x 16 blocks: 4 images cost twice 2)."""
    out = tmp_path / "cuda"
    code = run_cli("train", "--workers", 0, "--dataset", TINY_DATA, "--data-root", data_root, "--model", "micro",
                   "--backend", "cuda", "--epochs", 1, "--batch-size", 2, "--max-steps", 1, "--log-every", 1,
                   "--test-limit", 2, "--out", out, "--quiet")
    assert code == 0
    assert {p.name for p in out.iterdir()} >= {"metrics.jsonl", "model.npz", "summary.json"}
    assert json.loads((out / "summary.json").read_text())["backend"] == "cuda"


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--workers", 0, "--dataset", "mnist", "--quiet"], "unknown dataset"),
        (["train", "--workers", 0, "--dataset", "folder:/nonexistent/place", "--quiet"], "/nonexistent/place"),
        (["train", "--workers", 0, "--dataset", TINY_DATA, "--init", "/nonexistent.npz", "--quiet"], "checkpoint not found"),
        (["eval", "/nonexistent.npz"], "checkpoint not found"),
        (["train", "--workers", 0, "--dataset", TINY_DATA, "--model", "vgg", "--quiet"], "unknown model"),
        # --momentum and --lr are SGD's: with the server's Adagrad they are refused, not ignored
        (["train", "--workers", 2, "--optimizer", "adagrad", "--momentum", 0.5, "--quiet"], "--momentum is SGD's"),
        (["train", "--workers", 2, "--optimizer", "adagrad", "--lr", 0.1, "--quiet"], "--lr is SGD's"),
    ],
)
def test_user_errors_are_one_line(args, message, data_root, tmp_path, capsys):
    code = run_cli(*args, *(["--data-root", data_root] if args[0] == "train" else []),
                   *(["--out", tmp_path / "r"] if args[0] == "train" else []))
    assert code == 2
    err = capsys.readouterr().out.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_cuda_without_a_gpu_is_one_line(monkeypatch, capsys):
    from minasgd import backends
    from minasgd.backends import cuda_backend

    def no_gpu(device=None):
        raise backends.BackendError("cuda backend: cannot use GPU 0 (no driver).")

    monkeypatch.setattr(cuda_backend, "select_device", no_gpu)
    assert run_cli("bench", "step", "--backend", "cuda") == 2
    assert "cannot use GPU 0" in capsys.readouterr().out


def test_warm_start_from_another_model_is_refused(tmp_path, data_root, capsys):
    from minasgd import backends
    from minasgd.model import Model

    micro = Model("micro", backends.get("numpy"))
    path = checkpoint.save(tmp_path / "micro.npz", micro.name, micro.fingerprint(), micro.get_params())
    code = run_cli("train", "--workers", 0, "--dataset", TINY_DATA, "--data-root", data_root, "--model", "tiny",
                   "--init", path, "--quiet", "--out", tmp_path / "r")
    assert code == 2 and "is for model micro" in capsys.readouterr().out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "minasgd", "--help"], capture_output=True, text=True,
                            env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}, timeout=60)
    assert result.returncode == 0 and "train" in result.stdout

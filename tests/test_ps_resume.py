"""A run that survives its server: full-state checkpoints, `--resume`, workers that reconnect."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from minasgd import checkpoint
from minasgd.ps.server import ParameterServer
from minasgd.ps.tcp import ServerError, TcpClient, TcpServer, listen
from colours import colour_images

N = 500
FP = "toy:500:abc"


def make_ps(optimizer="sgd", path=None, **kw):
    return ParameterServer(np.linspace(-1, 1, N, dtype=np.float32), model_name="toy", fingerprint=FP,
                           total_steps=100, lr=0.1, warmup_steps=3, optimizer=optimizer, momentum=0.9,
                           checkpoint_path=path, worker_config={"nsync": 4}, **kw)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_checkpoint_holds_the_full_state_and_resume_continues_it(tmp_path, optimizer):
    path = tmp_path / "model.npz"
    a = make_ps(optimizer, path)
    wid = a.join(FP, {})
    rng = np.random.default_rng(0)
    grads = [rng.normal(0, 1, N).astype(np.float32) for _ in range(6)]
    for i, g in enumerate(grads[:3]):
        a.push(wid, g, base_version=max(0, i - 1), batches=4)
    a.reject("somebody", "for the record")
    assert a.checkpoint() == path
    with np.load(path, allow_pickle=False) as z:  # the documented format, nothing pickled
        assert set(z.files) >= {"params", "model", "fingerprint", "meta"}
        assert any(k.startswith("state.") for k in z.files)
        meta = json.loads(str(z["meta"]))
    assert meta["format"] == 2 and meta["version"] == 3 and meta["steps"] == 12 and meta["optimizer"] == optimizer

    b = make_ps(optimizer)
    b.resume(checkpoint.load(path, expect_fingerprint=FP))
    assert b.params.tobytes() == a.params.tobytes()
    assert (b.version, b.steps, b.pushes, b.rejected, b.lr()) == (a.version, a.steps, a.pushes, a.rejected, a.lr())
    assert b.staleness == a.staleness
    for k, v in a.optimizer.state().items():
        assert np.array_equal(b.optimizer.state()[k], v)
    wid_b = b.join(FP, {})
    for g in grads[3:]:  # the same pushes move both the same way: nothing was reset
        a.push(wid, g, a.version, batches=4)
        b.push(wid_b, g, b.version, batches=4)
    assert b.params.tobytes() == a.params.tobytes() and b.steps == a.steps == 24


def test_resume_refuses_a_parameters_only_checkpoint(tmp_path):
    path = checkpoint.save(tmp_path / "model.npz", "toy", FP, np.zeros(N, np.float32), {"step": 3})
    with pytest.raises(ValueError, match="only parameters"):
        make_ps().resume(checkpoint.load(path))
    a = make_ps("sgd", tmp_path / "full.npz")
    a.checkpoint()
    with pytest.raises(ValueError, match="optimizer is sgd"):
        make_ps("adagrad").resume(checkpoint.load(tmp_path / "full.npz"))


def test_a_worker_reconnects_and_never_pushes_twice():
    """The server goes away mid-run and comes back on the same port: the client reconnects, the
    push that was in flight is dropped (not resent), and the next push waits for a fresh fetch."""
    ps = make_ps()
    server = TcpServer(ps, listen("127.0.0.1", 0), timeout=5).start()
    address = server.address
    said = []
    client = TcpClient(address, timeout=3, reconnect=10, say=said.append)
    client.hello(FP, {"name": "w"}, num_params=N)
    params = np.empty(N, np.float32)
    assert client.fetch_into(params) == 0
    assert client.push(np.ones(N, np.float32), 0, batches=4)["version"] == 1
    server.close()  # the server dies

    restarted = make_ps()
    restarted.version = 7
    server = TcpServer(restarted, listen(*address), timeout=5).start()
    try:
        reply = client.push(np.ones(N, np.float32), 1, batches=4)  # lost with the old server
        assert reply.get("dropped") and restarted.pushes == 0
        assert client.push(np.ones(N, np.float32), 1, batches=4).get("dropped")  # still from old parameters
        assert restarted.pushes == 0
        assert client.fetch_into(params) == 7
        assert client.push(np.ones(N, np.float32), 7, batches=4)["version"] == 8 and restarted.pushes == 1
        assert client.reconnects == 1
        assert "reconnecting for up to 10 s" in said[0] and "reconnected" in said[1]
        client.close()
    finally:
        server.close()


def test_a_worker_gives_up_after_its_reconnect_time():
    ps = make_ps()
    server = TcpServer(ps, listen("127.0.0.1", 0), timeout=5).start()
    client = TcpClient(server.address, timeout=3, reconnect=0.5, say=lambda text: None)
    client.hello(FP, {}, num_params=N)
    server.close()
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="did not come back in 0.5 s"):
        client.fetch_into(np.empty(N, np.float32))
    assert time.monotonic() - t0 < 3


# ------------------------------------------------------------------ the whole thing, from the command line


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    for split, n, seed in (("train", 320, 1), ("test", 100, 2)):
        for i, (x, y) in enumerate(zip(*colour_images(n, seed))):
            (root / split / f"c{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(root / split / f"c{y}" / f"{i}.png")
    return root


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _minasgd(*args):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "minasgd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _run(tmp_path, folder, name, kill_at=None):
    """serve + 2 workers; with kill_at (a fraction of the steps), SIGKILL the server once its
    checkpoint has passed it and restart it with --resume. Returns (summary, checkpoint meta at the kill)."""
    port, out = _free_port(), tmp_path / name
    serve_args = ["--bind", f"127.0.0.1:{port}", "--workers", "2", "--dataset", f"folder:{folder}", "--model",
                  "micro", "--backend", "numpy", "--epochs", "150", "--batch-size", "16", "--lr", "0.005",
                  "--checkpoint-every", "0.2", "--async", "--nsync", "4"]
    server = _minasgd("serve", *serve_args, "--out", str(out))
    workers = [_minasgd("work", "--server", f"127.0.0.1:{port}", "--backend", "numpy", "--shard", f"{i}/2",
                        "--reconnect", "15") for i in (1, 2)]
    meta, processes = None, [server, *workers]
    try:
        if kill_at is not None:
            deadline = time.monotonic() + 60
            while meta is None or meta["steps"] < kill_at * meta["total_steps"]:
                assert time.monotonic() < deadline and server.poll() is None, "the run did not get going"
                time.sleep(0.05)
                try:
                    meta = checkpoint.load(out / "model.npz")["meta"]
                except checkpoint.CheckpointError:
                    pass
            server.send_signal(signal.SIGKILL)
            server.wait(timeout=10)
            meta = checkpoint.load(out / "model.npz")["meta"]  # the last checkpoint before the kill
            assert meta["steps"] < meta["total_steps"], "killed too late"
            server = _minasgd("serve", *serve_args, "--resume", str(out))
            processes.append(server)
        outputs = [p.communicate(timeout=90)[0] for p in workers]
        server_output = server.communicate(timeout=30)[0]
    finally:
        for p in processes:
            p.kill()
    assert server.returncode == 0, server_output
    assert all(p.returncode == 0 for p in workers), (outputs, server_output)
    if kill_at is not None:
        assert all("reconnecting for up to 15 s" in o and "reconnected" in o for o in outputs), outputs
    return json.loads((out / "summary.json").read_text()), meta


def test_sigkill_the_server_mid_run_and_resume_it(tmp_path, folder):
    undisturbed, _ = _run(tmp_path, folder, "undisturbed")
    resumed, at_kill = _run(tmp_path, folder, "resumed", kill_at=0.2)
    print(f"killed at step {at_kill['steps']}/{at_kill['total_steps']} (version {at_kill['version']}); "
          f"resumed: accuracy {resumed['test_accuracy']:.3f}, version {resumed['version']}, steps {resumed['steps']}; "
          f"undisturbed: accuracy {undisturbed['test_accuracy']:.3f}, version {undisturbed['version']}")
    # Everything from the checkpoint on was kept: the counters continue, every push counted was
    # applied exactly once (async: one update per push), and the run did all its steps.
    assert resumed["version"] == resumed["pushes"] > at_kill["version"]
    assert resumed["steps"] >= at_kill["total_steps"] and resumed["steps"] - at_kill["steps"] == \
        4 * (resumed["version"] - at_kill["version"])  # nsync 4 mini-batches per applied push
    assert resumed["test_accuracy"] >= undisturbed["test_accuracy"] - 0.15, (resumed, undisturbed)
    assert undisturbed["test_accuracy"] > 0.5


def test_train_with_workers_resumes_a_run(tmp_path):
    from minasgd.data import Dataset
    from minasgd.ps.launcher import PsOptions, train_distributed
    from minasgd.train import TrainConfig

    x, y = colour_images(160, 1)
    tx, ty = colour_images(40, 2)
    ds = Dataset("colours", [f"c{i}" for i in range(10)], x, y, tx, ty)
    out = tmp_path / "run"

    def cfg(epochs, **kw):
        return TrainConfig(model="micro", backend="numpy", epochs=epochs, batch_size=16, lr=0.02, quiet=True, **kw)

    first = train_distributed(cfg(2, out=str(out)), PsOptions(workers=1, nsync=4), dataset=ds)
    meta = checkpoint.load(out / "model.npz")["meta"]
    assert first["steps"] == meta["steps"] == 20 and meta["format"] == 2
    second = train_distributed(cfg(4), PsOptions(workers=1, nsync=4, resume=str(out)), dataset=ds)  # 2 more epochs
    assert second["steps"] == 40 and second["version"] == first["version"] + 5  # nsync 4: 5 more pushes
    assert second["pushes"] == first["pushes"] + 5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "epoch"][-1] == 40  # one metrics file, appended
    with pytest.raises(ValueError, match="no model.npz"):
        train_distributed(cfg(4), PsOptions(workers=1, resume=str(tmp_path / "nothing")), dataset=ds)


def test_a_reconnecting_worker_waits_out_a_full_server():
    server = TcpServer(make_ps(), listen("127.0.0.1", 0), timeout=5).start()
    address = server.address
    client = TcpClient(address, timeout=3, reconnect=10, say=lambda text: None)
    client.hello(FP, {}, num_params=N)
    server.close()
    server = TcpServer(make_ps(), listen(*address), timeout=5, max_connections=1).start()
    try:
        squatter = TcpClient(address, timeout=3)  # a worker: takes the only slot (a handshake would not)
        squatter.hello(FP, {"name": "squatter"}, num_params=N)
        squatter = squatter.sock
        time.sleep(0.1)
        threading.Timer(0.8, squatter.close).start()
        t0 = time.monotonic()
        assert client.fetch_into(np.empty(N, np.float32)) == 0  # refused "server full" until then
        assert 0.7 < time.monotonic() - t0 < 5 and server.refused >= 1 and client.reconnects == 1
        client.close()
    finally:
        server.close()

"""A parameter server that survives resume, signals, full disks and hostile strings (issue 22).

One test (or a few) per row of the issue's table, numbered like it; each failed on the code
before the fix. Small vectors, short timeouts: seconds each, except the signal tests, which run
`minasgd serve` and `minasgd work` as processes.
"""

import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from rich.console import Console

from minasgd import checkpoint
from minasgd.dashboard import ServerDashboard
from minasgd.ps import staleness as staleness_module
from minasgd.ps.launcher import PsOptions
from minasgd.ps.monitor import Monitor
from minasgd.ps.protocol import Msg, Receiver, clip, send_frame, send_json
from minasgd.ps.run import check_options, resume_server
from minasgd.ps.server import ParameterServer, Refused
from minasgd.ps.tcp import ServerError, TcpClient, TcpServer, listen, token_hmac
from minasgd.rundir import RunDir
from test_ps_hostile import FakeRun, wait_for

N = 200
FP = "toy:200:abc"
TOKEN = "s3cret"


def make_ps(path=None, **kw):
    options = dict(model_name="toy", fingerprint=FP, total_steps=10**6, lr=0.01, momentum=0.9,
                   checkpoint_path=path, worker_config={"batch_size": 8, "nsync": 4})
    options.update(kw)
    return ParameterServer(np.linspace(-1, 1, N, dtype=np.float32), **options)


def resumed_ps(tmp_path, version=7, **kw):
    """A server resumed from a checkpoint taken at `version` (steps 4 per version)."""
    first = make_ps(tmp_path / "model.npz", **kw)
    wid = first.join(FP, {})
    for v in range(version):
        if kw.get("sync"):
            first.push(wid, np.full(N, 1e-3, np.float32), v, batches=4)
        else:
            first.push(wid, np.full(N, 1e-3, np.float32), v, batches=4)
    first.checkpoint()
    ps = make_ps(**kw)
    ps.resume(checkpoint.load(tmp_path / "model.npz", expect_fingerprint=FP))
    assert ps.version == version
    return ps


@pytest.fixture
def serve():
    """serve(ps, **tcp_options) -> tcp: a live server for `ps` on a loopback port, closed after the test."""
    started = []

    def start(ps, **tcp_options):
        tcp_options.setdefault("timeout", 5.0)
        tcp = TcpServer(ps, listen("127.0.0.1", 0), **tcp_options).start()
        started.append(tcp)
        return tcp

    yield start
    for tcp in started:
        tcp.close()


def hostile(tcp, name="attacker", token=None, **hello):
    """A raw connection past the handshake: (sock, receiver)."""
    sock = socket.create_connection(tcp.address, timeout=5)
    rx = Receiver(sock)
    server_hello = rx.recv().json()
    body = {"fingerprint": FP, "name": name, **hello}
    if token:
        body["hmac"] = token_hmac(token, bytes.fromhex(server_hello["nonce"]))
    send_json(sock, Msg.HELLO, body, seq=1)
    assert rx.recv().type == Msg.WELCOME
    return sock, rx


def request(sock, rx, msg, payload=b"", count=0, version=0, seq=2):
    send_frame(sock, msg, payload, seq=seq, count=count, version=version)
    return rx.recv()


def assert_safe(text):
    """No control character (C0, DEL, C1: ESC), format character or lone surrogate in `text`."""
    assert text.isprintable(), repr(text)
    text.encode("utf-8")  # a lone surrogate cannot be encoded


def every_string(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from every_string(k)
            yield from every_string(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from every_string(v)


# ------------------------------------------------------------------ 1, 2. staleness after resume

def test_1_a_push_older_than_the_resumed_version_is_served(tmp_path, serve):
    ps = resumed_ps(tmp_path, version=7)
    tcp = serve(ps)
    sock, rx = hostile(tcp)
    reply = request(sock, rx, Msg.PUSH, np.full(N, 1e-3, np.float32), count=4, version=2)  # from before the resume
    assert reply.type == Msg.ACK and reply.json()["version"] == 8
    assert ps.workers[1].last_staleness == 0  # capped: counted from the resumed version, the oldest known
    reply = request(sock, rx, Msg.PUSH, np.full(N, 1e-3, np.float32), count=4, version=0, seq=3)
    assert reply.type == Msg.ACK and ps.workers[1].last_staleness == 4
    assert ps.staleness_of(10**6 - 1) >= 0 and ps.staleness_of(-3) == ps.steps - 28


def test_2_a_dropped_sync_round_after_resume_keeps_the_run_going(tmp_path):
    ps = resumed_ps(tmp_path, version=3, sync=True, round_timeout=5.0, momentum=0.0, lr=1.0)
    a, b = ps.join(FP, {}), ps.join(FP, {})
    replies = []

    def push(wid, grad, version):
        replies.append(ps.push(wid, grad, version, batches=1))

    def one_round(grad, version):
        threads = [threading.Thread(target=push, args=(wid, grad, version)) for wid in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=5)
        assert not any(t.is_alive() for t in threads)

    with np.errstate(over="ignore"):
        one_round(np.full(N, 3e38, np.float32), 3)  # each finite, their sum is not: the round is dropped
    assert ps.version == 4 and ps.discarded == 2 and ps.steps == 12
    one_round(np.full(N, 1e-3, np.float32), 4)  # based on the dropped round's version
    assert ps.version == 5 and ps.steps == 14 and len(replies) == 4
    assert ps.staleness_of(4) == 2  # the dropped version's step count was remembered


def test_2b_a_bug_in_a_request_is_one_error_frame_not_a_traceback(serve, monkeypatch):
    """Whatever the server raises while serving one worker (here a KeyError, as row 1's was) ends
    that connection with an ERROR frame and one event; the thread ends quietly and others are served."""
    ps = make_ps()
    tcp = serve(ps)
    tracebacks = []
    monkeypatch.setattr(threading, "excepthook", lambda args: tracebacks.append(args))
    sock, rx = hostile(tcp)

    def broken_push(*args, **kw):
        raise KeyError(3)

    monkeypatch.setattr(ps, "push", broken_push)
    frame = request(sock, rx, Msg.PUSH, np.zeros(N, np.float32), count=1)
    assert frame.type == Msg.ERROR and "internal error (KeyError" in frame.json()["error"]
    wait_for(lambda: ps.workers[1].left is not None)
    assert not tracebacks and ps.rejected == 1
    monkeypatch.undo()
    client = TcpClient(tcp.address, timeout=3)
    client.hello(FP, {"name": "real"})
    assert client.push(np.zeros(N, np.float32), 0, 1)["version"] == 1
    client.close()


def test_2c_a_bug_in_a_handshake_drops_that_connection_only(serve, monkeypatch):
    ps = make_ps()
    tcp = serve(ps, token=TOKEN)
    check_token = TcpServer._check_token

    def broken(self, hello, nonce):
        if hello.get("name") == "trigger":
            raise KeyError("oops")
        return check_token(self, hello, nonce)

    monkeypatch.setattr(TcpServer, "_check_token", broken)
    sock = socket.create_connection(tcp.address, timeout=3)
    rx = Receiver(sock)
    rx.recv()
    send_json(sock, Msg.HELLO, {"fingerprint": FP, "name": "trigger"}, seq=1)
    assert sock.recv(1 << 16) == b""  # dropped
    wait_for(lambda: ps.rejected == 1)
    assert "internal error in the handshake (KeyError" in ps.recent_events(1)[0][1] and tcp.thread.is_alive()
    client = TcpClient(tcp.address, TOKEN, timeout=3)
    assert client.hello(FP, {"name": "real"})["worker_id"] == 1
    client.close()


# ------------------------------------------------------------------ 3, 4. signals

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image

    from colours import colour_images

    root = tmp_path_factory.mktemp("colours")
    for split, n, seed in (("train", 160, 1), ("test", 40, 2)):
        for i, (x, y) in enumerate(zip(*colour_images(n, seed))):
            (root / split / f"c{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(root / split / f"c{y}" / f"{i}.png")
    return root


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _minasgd(*args, stdout=subprocess.PIPE):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "minasgd", *args], stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _meta(path):
    try:
        return checkpoint.load(path)["meta"]
    except checkpoint.CheckpointError:
        return None


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_3_4_every_stop_signal_checkpoints_and_workers_keep_reconnecting(tmp_path, folder, signame):
    port, out = _free_port(), tmp_path / "run"

    def serve_args(epochs):
        return ["serve", "--bind", f"127.0.0.1:{port}", "--workers", "1", "--dataset", f"folder:{folder}",
                "--model", "micro", "--backend", "numpy", "--epochs", str(epochs), "--batch-size", "16",
                "--lr", "0.005", "--checkpoint-every", "0.5", "--quiet"]

    server = _minasgd(*serve_args(400), "--out", str(out))
    log_path = tmp_path / "worker.log"
    worker_log = open(log_path, "w")
    worker = _minasgd("work", "--server", f"127.0.0.1:{port}", "--backend", "numpy", "--reconnect", "40",
                      stdout=worker_log)
    processes = [server, worker]
    try:
        deadline = time.monotonic() + 60
        while (meta := _meta(out / "model.npz")) is None or meta["steps"] < 20:
            assert time.monotonic() < deadline and server.poll() is None, "the run did not get going"
            time.sleep(0.1)
        server.send_signal(getattr(signal, signame))
        time.sleep(0.05)  # and again while it shuts down (an impatient operator): the checkpoint still comes
        if server.poll() is None:
            server.send_signal(getattr(signal, signame))
        output = server.communicate(timeout=30)[0]
        # 128 + n; or killed by the second signal after all was saved and said, before the exit
        assert server.returncode in (128 + getattr(signal, signame), -getattr(signal, signame)), output
        assert f"stopped by {signame}" in output and "--resume" in output and "Traceback" not in output, output
        final = checkpoint.load(out / "model.npz")["meta"]  # the final checkpoint
        assert final["format"] == 2 and meta["steps"] <= final["steps"] < final["total_steps"]
        # the worker heard "server stopping", not "training finished": it keeps trying for 40 s
        wait_for(lambda: "reconnecting for up to 40 s" in log_path.read_text(), 10)
        time.sleep(1.0)
        assert worker.poll() is None, log_path.read_text()
        assert "server stopping" in log_path.read_text() and "training finished" not in log_path.read_text()
        if signame == "SIGTERM":  # and the resumed server gets it back: the run finishes
            resumed = _minasgd(*serve_args(final["steps"] // 10 + 2), "--resume", str(out))
            processes.append(resumed)
            output = resumed.communicate(timeout=60)[0]
            assert resumed.returncode == 0, output
            assert worker.wait(timeout=30) == 0, log_path.read_text()
            assert "reconnected" in log_path.read_text()
            summary = json.loads((out / "summary.json").read_text())
            assert summary["steps"] > final["steps"] and summary["version"] > final["version"]
    finally:
        for p in processes:
            p.kill()
            p.wait()
        worker_log.close()


def test_3b_a_signal_the_process_ignores_stays_ignored():
    """`nohup minasgd serve` ignores SIGHUP: logging out must not stop the server then."""
    from minasgd.ps.launcher import stop_signals_set

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        flag = threading.Event()
        with stop_signals_set(flag):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGTERM)
            wait_for(flag.is_set)
        assert flag.signal == "SIGTERM" and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


def test_4_an_interrupted_server_says_stopping_to_every_request(tmp_path, serve):
    ps = make_ps(sync=True, round_timeout=30.0)
    ps.expected_workers = 2
    tcp = serve(ps)
    waiting, waiting_rx = hostile(tcp, name="in a round")
    other, other_rx = hostile(tcp, name="other")
    replies = []
    thread = threading.Thread(target=lambda: replies.append(
        request(waiting, waiting_rx, Msg.PUSH, np.zeros(N, np.float32), count=1)))
    thread.start()
    wait_for(lambda: ps.round_members)
    ps.stop(interrupted=True)
    thread.join(timeout=5)
    assert replies[0].type == Msg.ERROR and replies[0].json()["error"].startswith("server stopping")
    frame = request(other, other_rx, Msg.FETCH)
    assert frame.type == Msg.ERROR and frame.json()["error"].startswith("server stopping")
    with pytest.raises(ServerError, match="server stopping") as e:  # a (re)joining worker: come back later
        TcpClient(tcp.address, timeout=3, connect_timeout=0.5).hello(FP, {})
    assert type(e.value).__name__ == "ConnectionLost"
    finished = make_ps(total_steps=1)  # whereas a finished run says so
    finished.steps = 1
    finished.stop(interrupted=True)
    assert not finished.interrupted


# ------------------------------------------------------------------ 5. a full disk

RUN_DIR_ON_A_SMALL_DISK = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
from minasgd.rundir import RunDir
run = RunDir(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
results = [run.log({"kind": "step", "step": i, "pad": "x" * 100}) for i in range(40)]
try:
    run.write_summary({"pad": "x" * 10000})
    summary_error = None
except OSError as e:
    summary_error = str(e)
print(json.dumps({"results": results, "error": run.log_error, "summary_error": summary_error}))
"""


def test_5_a_failed_metrics_write_is_a_warning_not_the_end(tmp_path):
    done = subprocess.run([sys.executable, "-c", RUN_DIR_ON_A_SMALL_DISK, str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["results"][0] is True and report["results"][-1] is False
    assert "metrics.jsonl" in report["error"]
    assert report["summary_error"].startswith("cannot write") and "summary.json" in report["summary_error"]
    assert not (tmp_path / "run" / "summary.json.tmp").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert lines and all(line.endswith("\n") and json.loads(line)["kind"] == "step" for line in lines)  # whole lines


def test_5b_the_monitor_warns_once_and_training_goes_on(monkeypatch, tmp_path):
    ps = make_ps()
    run = RunDir(tmp_path / "run")
    monitor = Monitor(ps, run, None, None, None, steps_per_epoch=10, batch_size=8, log_every=0.0)
    real_write = os.write

    def disk_full(fd, data):
        if fd == run._metrics:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr("minasgd.rundir.os.write", disk_full)
    for _ in range(3):
        monitor.tick()
        monitor.next_log = 0.0
    warnings = [text for _, text in ps.recent_events(10) if "No space left" in text]
    assert len(warnings) == 1 and "training goes on" in warnings[0]
    monkeypatch.undo()
    monitor.tick()
    assert "written again" in ps.recent_events(1)[0][1]
    assert json.loads(run.metrics_path.read_text().splitlines()[-1])["kind"] == "step"
    run.close()


# ------------------------------------------------------------------ 6, 7. hostile strings

NASTY = ["\x1b]52;c;ZXZpbA==\x07", "\x1b[2J\x1b[H", "\x9b31m", "bidi\u202eevil", "nul\x00", "\ud800", "line\nbreak"]


@pytest.mark.parametrize("nasty", NASTY)
def test_clip_makes_any_string_safe(nasty):
    safe = clip(f"a {nasty} b")
    assert_safe(safe) if "\ud800" not in nasty else safe.encode("utf-8")
    assert safe.isprintable() and safe.startswith("a ") and safe.endswith(" b")
    assert len(clip("x" * 1000, 50)) == 50


def test_6_7_peer_strings_reach_no_terminal_or_log_raw(serve):
    ps = make_ps()
    tcp = serve(ps)
    for i, nasty in enumerate(NASTY):
        sock, rx = hostile(tcp, name=f"w{i} {nasty}")
        body = json.dumps({"reason": f"bye {nasty}"}).encode()  # "\ud800" as JSON's own \\ud800 escape
        send_frame(sock, Msg.BYE, body, seq=2)
        sock.close()
        bad = socket.create_connection(tcp.address, timeout=3)  # a refused HELLO quotes the fingerprint
        brx = Receiver(bad)
        brx.recv()
        send_frame(bad, Msg.HELLO, json.dumps({"fingerprint": f"fp {nasty}"}).encode(), seq=1)
        error = brx.recv()
        assert error.type == Msg.ERROR
        assert_safe(error.json()["error"])
        bad.close()
    wait_for(lambda: sum(w.left is not None for w in ps.workers.values()) == len(NASTY))
    wait_for(lambda: ps.rejected == len(NASTY))
    stats = ps.stats()
    for text in [*every_string(stats), *(t for _, t in ps.recent_events(100))]:
        assert_safe(text)
    json.dumps(stats, ensure_ascii=False).encode("utf-8")  # summary.json / metrics.jsonl would take it
    raw = io.BytesIO()
    terminal = io.TextIOWrapper(raw, encoding="utf-8", errors="strict", write_through=True)
    console = Console(file=terminal, force_terminal=True, color_system="truecolor", width=200)
    monitor = Monitor(ps, FakeRun(), None, None, None, steps_per_epoch=10, batch_size=8)
    console.print(ServerDashboard(monitor).render())  # row 7: no UnicodeEncodeError
    terminal.flush()
    out = raw.getvalue()
    assert b"\x1b]52" not in out and b"\x1b[2J" not in out and b"\xc2\x9b" not in out and "\u202e".encode() not in out
    assert b"bye ?]52;c;ZXZpbA==?" in out or b"bye ?]52" in out


# ------------------------------------------------------------------ 8. handshake slots under attack

def _squat(address, stop, counter):
    """One attacker: connect, say nothing, and reconnect the moment the server drops us."""
    while not stop.is_set():
        try:
            sock = socket.create_connection(address, timeout=2)
        except OSError:
            time.sleep(0.01)
            continue
        counter.append(1)
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                if not sock.recv(1 << 16):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        sock.close()


def join_times_under_attack(serve, attackers, tries=10, **tcp_options):
    """Seconds each of `tries` token-holding workers took to join while `attackers` token-less
    connections retake every handshake slot the moment it frees (None: did not join in 5 s)."""
    ps = make_ps()
    tcp = serve(ps, token=TOKEN, **tcp_options)
    stop, counter = threading.Event(), []
    threads = [threading.Thread(target=_squat, args=(tcp.address, stop, counter), daemon=True)
               for _ in range(attackers)]
    for t in threads:
        t.start()
    times = []
    try:
        wait_for(lambda: len(counter) >= attackers, 10)
        for i in range(tries):
            t0 = time.monotonic()
            try:
                client = TcpClient(tcp.address, TOKEN, timeout=5, connect_timeout=5)
                client.hello(FP, {"name": f"real {i}"})
                times.append(time.monotonic() - t0)
                client.close()
            except (ServerError, OSError):
                times.append(None)
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
    joined = [t for t in times if t is not None and t < 5.0]
    print(f"{attackers} attackers, {tcp_options}: joined {len(joined)}/{tries}, "
          f"times {[round(t, 3) if t is not None else None for t in times]}, attacker connections {len(counter)}, "
          f"handshakes dropped {tcp.dropped}")
    return joined


@pytest.mark.parametrize("attackers, options", [(12, {"max_connections": 8, "max_handshakes": 8,
                                                      "handshake_timeout": 1.0}),
                                                (12, {"max_connections": 8, "handshake_timeout": 1.0}),
                                                (100, {"handshake_timeout": 1.0})])
def test_8_a_worker_with_the_token_joins_while_the_handshake_slots_are_attacked(serve, attackers, options):
    joined = join_times_under_attack(serve, attackers, **options)
    assert len(joined) >= 9


def test_8b_a_worker_dropped_during_its_handshake_tries_again(serve, monkeypatch):
    """Under a flood the oldest handshake may be dropped before our HELLO arrives: the worker
    connects again (for up to its connect timeout) instead of giving up."""
    ps = make_ps()
    tcp = serve(ps, token=TOKEN)
    read_hello, dropped = TcpServer._read_hello, []

    def drop_twice(self, handshake):
        if len(dropped) < 2:
            dropped.append(handshake.who)
            self._end_handshake(handshake.sock)
            handshake.sock.close()
            return
        read_hello(self, handshake)

    monkeypatch.setattr(TcpServer, "_read_hello", drop_twice)
    t0 = time.monotonic()
    client = TcpClient(tcp.address, TOKEN, timeout=3, connect_timeout=5)
    assert client.hello(FP, {"name": "real"})["worker_id"] == 1
    assert len(dropped) == 2 and time.monotonic() - t0 < 1.0
    client.close()
    with pytest.raises(ServerError, match="token"):  # a refusal is not retried
        TcpClient(tcp.address, "wrong", timeout=3, connect_timeout=5).hello(FP, {})


# ------------------------------------------------------------------ 9. sync: a peer that skips every other round

def test_9_a_peer_pushing_every_other_round_stalls_at_most_a_few_rounds():
    ps = make_ps(sync=True, round_timeout=0.4, momentum=0.0)
    real, flaky = ps.join(FP, {"name": "real"}), ps.join(FP, {"name": "flaky"})
    t0 = time.monotonic()
    for version in range(12):
        threads = []
        if version % 2 == 0:
            threads.append(threading.Thread(target=ps.push, args=(flaky, np.zeros(N, np.float32), version, 1)))
            threads[-1].start()
            wait_for(lambda: flaky in ps.round_members)
        ps.push(real, np.full(N, 1e-4, np.float32), version, 1)
        for t in threads:
            t.join(timeout=5)
    seconds = time.monotonic() - t0
    assert ps.version == 12
    assert seconds < 3 * 0.4, f"{seconds:.2f} s: skipped rounds kept waiting out the deadline"
    assert ps.workers[flaky].missed_rounds <= 2


# ------------------------------------------------------------------ 10. a forged npush

def test_10_a_declared_npush_beyond_the_runs_is_refused(serve):
    ps = make_ps()  # nsync 4
    tcp = serve(ps)
    sock = socket.create_connection(tcp.address, timeout=3)
    rx = Receiver(sock)
    rx.recv()
    send_json(sock, Msg.HELLO, {"fingerprint": FP, "npush": 1024}, seq=1)
    frame = rx.recv()
    assert frame.type == Msg.ERROR and "from 1 to 4" in frame.json()["error"] and "--nsync" in frame.json()["error"]
    sock, rx = hostile(tcp, npush=4)
    frame = request(sock, rx, Msg.PUSH, np.zeros(N, np.float32), count=1024)
    assert frame.type == Msg.ERROR and ps.steps == 0
    with pytest.raises(Refused):
        ps.push(99, np.zeros(N, np.float32), 0, batches=5)  # an unknown worker: the run's npush bounds it too


# ------------------------------------------------------------------ 11. the staleness histogram

def test_11_pushes_based_on_version_0_keep_the_histogram_small(tmp_path):
    ps = make_ps(tmp_path / "model.npz", momentum=0.0, lr=1e-6)
    wid = ps.join(FP, {})
    for _ in range(3000):
        ps.push(wid, np.zeros(N, np.float32), 0, batches=4)
    assert ps.steps == 12000 and sum(ps.staleness.values()) == 3000
    assert len(ps.staleness) <= 140, len(ps.staleness)
    assert staleness_module.staleness_bucket(11996) == 8192 and staleness_module.staleness_bucket(5) == 5
    assert len(json.dumps(ps.stats()["staleness"])) < 3000
    ps.checkpoint()
    assert (tmp_path / "model.npz").stat().st_size < 8 * N + 8000
    again = make_ps()
    again.resume(checkpoint.load(tmp_path / "model.npz"))
    assert again.staleness == ps.staleness


# ------------------------------------------------------------------ 12, 13. damaged checkpoints

def _write_npz(path, arrays, compression=zipfile.ZIP_STORED):
    """An .npz of raw .npy members (bytes or arrays), as np.savez writes, or not."""
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, value in arrays.items():
            if isinstance(value, bytes):
                z.writestr(name + ".npy", value)
            else:
                buffer = io.BytesIO()
                np.lib.format.write_array(buffer, np.asanyarray(value), allow_pickle=False)
                z.writestr(name + ".npy", buffer.getvalue())


def _good_arrays(meta=None, params=None):
    meta = {"format": 2, "version": 5, "steps": 20, "total_steps": 10**6, "optimizer": "sgd", "pushes": 5,
            "staleness": {"0": 5}} if meta is None else meta
    return {"params": np.linspace(-1, 1, N, dtype=np.float32) if params is None else params,
            "model": np.array("toy"), "fingerprint": np.array(FP),
            "meta": np.array(meta if isinstance(meta, str) else json.dumps(meta)),
            "state.velocity": np.zeros(N, np.float32)}


def _npy_header_only(shape, descr="<f4"):
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + b"\x00" * 64


BAD_META = {
    "version -5": {"format": 2, "version": -5, "steps": 20, "optimizer": "sgd"},
    "version 2**70": {"format": 2, "version": 2**70, "steps": 20, "optimizer": "sgd"},
    "version missing": {"format": 2, "steps": 20, "optimizer": "sgd"},
    "version a list": {"format": 2, "version": [1], "steps": 20, "optimizer": "sgd"},
    "version true": {"format": 2, "version": True, "steps": 20, "optimizer": "sgd"},
    "steps Infinity": '{"format": 2, "version": 1, "steps": Infinity, "optimizer": "sgd"}',
    "pushes a string": {"format": 2, "version": 1, "steps": 4, "optimizer": "sgd", "pushes": "many"},
    "staleness a list": {"format": 2, "version": 1, "steps": 4, "optimizer": "sgd", "staleness": [1, 2]},
    "staleness key": {"format": 2, "version": 1, "steps": 4, "optimizer": "sgd", "staleness": {"-1": 2}},
    "staleness huge": {"format": 2, "version": 1, "steps": 4, "optimizer": "sgd",
                       "staleness": {str(i): 1 for i in range(5000)}},
    "train_seconds nan": '{"format": 2, "version": 1, "steps": 4, "optimizer": "sgd", "train_seconds": NaN}',
    "meta a list": [1, 2, 3],
    "nested 100000 deep": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("case", sorted(BAD_META))
def test_12_bad_meta_is_one_line_and_changes_nothing(tmp_path, case):
    _write_npz(tmp_path / "model.npz", _good_arrays(meta=BAD_META[case]))
    ps = make_ps()
    before = ps.params.tobytes()
    with pytest.raises(ValueError) as e:
        resume_server(ps, tmp_path)
    assert "\n" not in str(e.value) and "--resume" in str(e.value)
    assert ps.params.tobytes() == before and ps.version == 0


@pytest.mark.parametrize("case", ["2**40 floats", "object array", "2-D params", "NaN params", "NaN state",
                                  "no meta", "a pickle", "truncated data"])
def test_12_bad_arrays_are_one_line(tmp_path, case):
    arrays = _good_arrays()
    if case == "2**40 floats":
        arrays["params"] = _npy_header_only((2**40,))
    elif case == "object array":
        arrays["params"] = _npy_header_only((3,), descr="|O")
    elif case == "2-D params":
        arrays["params"] = np.zeros((10, 20), np.float32)
    elif case == "NaN params":
        arrays["params"] = np.full(N, np.nan, np.float32)
    elif case == "NaN state":
        arrays["state.velocity"] = np.full(N, np.inf, np.float32)
    elif case == "no meta":
        del arrays["meta"]
    elif case == "a pickle":
        arrays["meta"] = b"\x80\x04\x95" + b"\x00" * 40
    else:
        arrays["params"] = _npy_header_only((N,))[:100]
    _write_npz(tmp_path / "model.npz", arrays)
    ps = make_ps()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as e:
            resume_server(ps, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(e.value) and peak < 10 * 2**20
    assert ps.version == 0 and np.isfinite(ps.params).all()
    if case == "NaN params":  # refused by the loader itself too (a warm start, --init, reads only that)
        with pytest.raises(checkpoint.CheckpointError, match="NaN"):
            checkpoint.load(tmp_path / "model.npz")


def test_12_a_zip_bomb_is_refused_before_it_is_read(tmp_path):
    arrays = _good_arrays()
    arrays["state.velocity"] = np.zeros(32 * 2**20, np.float32)  # 128 MB of zeros, deflated to ~130 kB
    _write_npz(tmp_path / "model.npz", arrays, zipfile.ZIP_DEFLATED)
    assert (tmp_path / "model.npz").stat().st_size < 2**20
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(checkpoint.CheckpointError, match="unpack to"):
            checkpoint.load(tmp_path / "model.npz")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20 and time.monotonic() - t0 < 1.0


def test_12_every_single_byte_flip_is_loaded_or_one_line(tmp_path):
    good = tmp_path / "good.npz"
    ps = make_ps(good)
    wid = ps.join(FP, {})
    for v in range(3):
        ps.push(wid, np.full(N, 1e-3, np.float32), v, batches=4)
    ps.checkpoint()
    data = bytearray(good.read_bytes())
    bad, outcomes = tmp_path / "model.npz", {"loaded": 0, "refused": 0}
    # Every byte of each member's zip and .npy headers and of the central directory; every 5th elsewhere.
    with zipfile.ZipFile(good) as z:
        headers = {i for info in z.infolist() for i in range(info.header_offset, info.header_offset + 200)}
    central = data.find(b"PK\x01\x02")
    positions = sorted({i for i in range(len(data)) if i in headers or i >= central or i % 5 == 0})
    target = make_ps()
    for i in positions:
        for flip in (0xFF,):
            data[i] ^= flip
            bad.write_bytes(data)
            data[i] ^= flip
            try:
                resume_server(target, tmp_path)
                outcomes["loaded"] += 1
            except ValueError as e:
                assert "\n" not in str(e)
                outcomes["refused"] += 1
    print(f"{len(positions)} single-byte flips: {outcomes}")
    assert outcomes["refused"] > 0


def test_13_stale_temporary_files_are_removed_on_resume(tmp_path):
    ps = make_ps(tmp_path / "model.npz")
    ps.checkpoint()
    (tmp_path / "model.npz.k1ll3d.tmp").write_bytes(b"\x00" * 1000)
    (tmp_path / "other.tmp").write_bytes(b"mine")
    again = make_ps()
    resume_server(again, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz", "other.tmp"]
    assert any("model.npz.k1ll3d.tmp" in text for _, text in again.recent_events(5))


KILLED_WRITER = """
import sys, numpy as np
from minasgd import checkpoint
params = np.zeros(2_000_000, np.float32)
print("ready", flush=True)
i = 0
while True:
    i += 1
    checkpoint.save(sys.argv[1], "toy", "toy:fp", params + i, {"format": 2, "version": i})
"""


def test_13_kill_9_while_writing_leaves_a_loadable_checkpoint_and_resume_cleans_up(tmp_path):
    path = tmp_path / "model.npz"
    for _ in range(3):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(0.25)
        writer.kill()
        writer.wait()
        if path.exists():
            assert checkpoint.load(path)["meta"]["version"] >= 1
    checkpoint.remove_stale_temporaries(path)
    assert [p.name for p in tmp_path.iterdir()] in (["model.npz"], [])


# ------------------------------------------------------------------ 14. flags

@pytest.mark.parametrize("flag, value", [("timeout", 0), ("timeout", -1), ("timeout", float("nan")),
                                         ("max_connections", 0), ("max_connections", -5),
                                         ("handshake_timeout", 0), ("handshake_timeout", float("nan")),
                                         ("round_timeout", 0), ("checkpoint_every", -1),
                                         ("checkpoint_every", float("inf")), ("eval_every", 0), ("reconnect", -1),
                                         ("nsync", 0), ("npush", 0), ("max_handshakes", 0)])
def test_14_flags_that_would_stall_the_run_are_refused(flag, value):
    with pytest.raises(ValueError, match="--" + flag.replace("_", "-")):
        check_options(PsOptions(**{flag: value}))


@pytest.mark.parametrize("args", [["serve", "--timeout", "nan"], ["serve", "--max-connections", "0"],
                                  ["serve", "--handshake-timeout", "0"], ["work", "--server", "127.0.0.1:1",
                                                                          "--timeout", "-1"]])
def test_14_the_command_line_says_one_line(args, capsys, tmp_path):
    from minasgd.cli import main

    assert main([*args, "--out", str(tmp_path / "run")] if args[0] == "serve" else args) == 2
    out = capsys.readouterr().out.strip()
    assert "must be" in out and len(out.splitlines()) == 1, out
    assert not (tmp_path / "run").exists()


def test_14_the_tcp_server_refuses_them_too():
    for options in ({"timeout": math.nan}, {"handshake_timeout": 0}, {"max_connections": 0}):
        listener = listen("127.0.0.1", 0)
        with pytest.raises(ValueError):
            TcpServer(make_ps(), listener, **options)
        listener.close()


def test_serve_help_says_what_the_token_does_not_protect(capsys):
    from minasgd.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "NOT encrypt" in text and "in the clear" in text and "SSH tunnel or a VPN" in text

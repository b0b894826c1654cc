"""A hostile client against a live parameter server on 127.0.0.1 (issue 13).

Each test attacks the server the way one malicious or broken peer could, then checks that the
parameters are bit-identical (or changed only by valid pushes) and that a real worker is still
served: joins, fetches, pushes, reports, leaves. Numbered tests are the issue's cases 1-11;
`test_known_malformed_frames` keeps the attacks that were already refused. Everything runs on
small vectors with short timeouts: the whole module takes a few seconds.
"""

import errno
import json
import math
import os
import re
import socket
import struct
import threading
import time
import tracemalloc

import numpy as np
import pytest
from rich.console import Console

from minasgd import checkpoint
from minasgd.dashboard import ServerDashboard
from minasgd.ps import protocol, registry as registry_module, tcp as tcp_module
from minasgd.ps.monitor import Monitor
from minasgd.ps.protocol import HEADER, MAGIC, MAX_JSON, PROTOCOL, Msg, Receiver, send_frame, send_json
from minasgd.ps.server import ParameterServer
from minasgd.ps.tcp import ServerError, TcpClient, TcpServer, listen, token_hmac

N = 1000
FP = "toy:1000:abc"
TOKEN = "s3cret"


# ------------------------------------------------------------------ a live server, and a real worker

@pytest.fixture
def serve():
    """serve(**options) -> (ps, tcp): a live server on a loopback port, closed after the test."""
    started = []

    def start(n=N, token=None, listener=None, ps_options=None, **tcp_options):
        ps = ParameterServer(np.arange(n, dtype=np.float32) / n, model_name="toy",
                             fingerprint=FP if n == N else f"toy:{n}:abc", total_steps=10**6, lr=0.1,
                             momentum=0.9, worker_config={"batch_size": 8, "nsync": 2}, **(ps_options or {}))
        tcp_options.setdefault("timeout", 5.0)
        tcp = TcpServer(ps, listener or listen("127.0.0.1", 0), token=token, **tcp_options).start()
        started.append(tcp)
        return ps, tcp

    yield start
    for tcp in started:
        tcp.close()


def assert_serves_a_real_worker(ps, tcp, token=None):
    """A real worker joins, fetches exactly the server's parameters, pushes once (applied), reports, leaves."""
    version = ps.version
    client = TcpClient(tcp.address, token, timeout=3.0, connect_timeout=2.0)
    client.hello(FP, {"name": "real worker"})
    params = np.empty(N, np.float32)
    assert client.fetch_into(params) == version
    assert params.tobytes() == ps.params.tobytes()
    reply = client.push(np.full(N, 1e-3, np.float32), version, batches=1)
    assert reply["version"] == version + 1 and not reply["done"]
    assert not np.array_equal(params, ps.params) and np.isfinite(ps.params).all()
    stats = client.stats({"loss": 0.5, "images_per_second": 10.0})
    assert stats["version"] == version + 1
    client.close("finished")


def hostile(tcp, token=None, name="attacker", **hello):
    """A raw connection past the handshake: (sock, receiver)."""
    sock = socket.create_connection(tcp.address, timeout=3)
    rx = Receiver(sock)
    server_hello = rx.recv().json()
    body = {"fingerprint": FP, "name": name, **hello}
    if token:
        body["hmac"] = token_hmac(token, bytes.fromhex(server_hello["nonce"]))
    send_json(sock, Msg.HELLO, body, seq=1)
    assert rx.recv().type == Msg.WELCOME
    return sock, rx


def answer(sock, rx, msg, payload=b"", count=0, version=0):
    """Send one frame; the server's reply frame (ERROR, ACK, ...)."""
    send_frame(sock, msg, payload, seq=2, count=count, version=version)
    return rx.recv()


def error_of(frame):
    assert frame.type == Msg.ERROR, f"expected ERROR, got {frame.type.name}"
    return frame.json()["error"]


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class FakeRun:
    """What Monitor needs of a RunDir: a log."""

    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)


def monitor_for(ps):
    return Monitor(ps, FakeRun(), None, None, None, steps_per_epoch=10, batch_size=8)


# ------------------------------------------------------------------ 1. STATS

@pytest.mark.parametrize("body, message", [
    (b'{"loss": ' + b"9" * 400 + b"}", "out of range"),
    (b'{"loss": NaN}', "finite"),
    (b'{"images_per_second": 1e308}', "below 2\\*\\*53"),
    (b'{"loss": "high"}', "must be a number"),
    (b'{"steps": 1.5}', "integer"),
    (b'{"alive": false}', "unknown"),
    (b'{"name": "root", "left": null}', "unknown"),
    (b'{"anything": 1}', "unknown"),
])
def test_1_stats_are_checked_against_a_schema(serve, body, message):
    ps, tcp = serve()
    before = ps.params.tobytes()
    sock, rx = hostile(tcp)
    assert re.search(message, error_of(answer(sock, rx, Msg.STATS, body)))
    sock.close()
    assert ps.workers[1].report == {} and ps.workers[1].as_dict()["name"] == "attacker"
    monitor_for(ps).log_step()  # the monitor (where the 400-digit integer crashed the server) is fine
    assert ps.params.tobytes() == before and ps.rejected == 1
    assert_serves_a_real_worker(ps, tcp)


# ------------------------------------------------------------------ 2. the accept loop

class FlakyListener:
    """A listening socket whose accept() fails with EMFILE `failures` times first."""

    def __init__(self, sock, failures):
        self.sock, self.failures = sock, failures

    def accept(self):
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_2_accept_loop_survives_emfile_and_a_failed_thread_start(serve, monkeypatch):
    ps, tcp = serve(listener=FlakyListener(listen("127.0.0.1", 0), failures=3))
    assert_serves_a_real_worker(ps, tcp)  # after three EMFILE failures

    start, failed = threading.Thread.start, []

    def start_or_fail(thread):
        if thread.name.startswith("ps-conn") and not failed:
            failed.append(thread.name)
            raise RuntimeError("can't start new thread")
        return start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_fail)
    victim = socket.create_connection(tcp.address, timeout=3)  # a thread only after its HELLO (issue 22)
    victim_rx = Receiver(victim)
    assert victim_rx.recv().type == Msg.HELLO
    send_json(victim, Msg.HELLO, {"fingerprint": FP, "name": "victim"}, seq=1)
    with pytest.raises(protocol.ConnectionClosed):
        victim_rx.recv()  # that one connection is dropped...
    victim.close()
    assert failed and tcp.thread.is_alive()
    assert_serves_a_real_worker(ps, tcp)  # ...and the next one is served
    tcp.close()
    assert not tcp.thread.is_alive()


# ------------------------------------------------------------------ 3. unauthenticated connections

def test_3a_connections_are_capped_with_a_clear_refusal(serve):
    ps, tcp = serve(max_connections=4)
    workers = [hostile(tcp, name=f"w{i}")[0] for i in range(4)]  # past the handshake: the 4 slots are taken
    wait_for(lambda: len(tcp.connections) == 4)
    extra = socket.create_connection(tcp.address, timeout=3)
    assert "server full" in error_of(Receiver(extra).recv())
    extra.close()
    for sock in workers:
        sock.close()
    wait_for(lambda: not tcp.connections)
    assert_serves_a_real_worker(ps, tcp)


def test_3b_the_handshake_has_a_total_deadline(serve):
    ps, tcp = serve(handshake_timeout=0.6, timeout=30.0)
    sock = socket.create_connection(tcp.address, timeout=5)
    Receiver(sock).recv()  # the server's HELLO
    header = HEADER.pack(MAGIC, PROTOCOL, Msg.HELLO, 0, 100, 1, 0)
    t0, closed = time.monotonic(), False
    for byte in header:  # one byte every 0.2 s: each recv() is quick, the whole is not
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.2)
        if time.monotonic() - t0 > 3.0:
            break
    if not closed:
        sock.settimeout(2.0)
        try:
            closed = sock.recv(1 << 16) is not None  # ERROR-less hang-up (b"") or a reset
        except (ConnectionResetError, TimeoutError) as e:
            closed = isinstance(e, ConnectionResetError)
    assert closed and time.monotonic() - t0 < 3.0
    sock.close()
    assert_serves_a_real_worker(ps, tcp)


def test_3c_no_parameter_sized_buffer_before_the_handshake(serve, monkeypatch):
    sizes = []
    resize = Receiver.resize
    monkeypatch.setattr(Receiver, "resize", lambda self, n: (sizes.append(n), resize(self, n))[1])
    ps, tcp = serve(n=100_000)
    idle = [socket.create_connection(tcp.address, timeout=3) for _ in range(3)]
    wait_for(lambda: len(tcp.handshakes) == 3)
    time.sleep(0.1)
    assert max(sizes, default=0) <= MAX_JSON, "an unauthenticated connection got a parameter-sized buffer"
    assert not tcp.connections, "an unauthenticated connection got a thread"
    for sock in idle:
        sock.close()


def test_3d_control_frames_are_bounded_to_64_kib(serve):
    ps, tcp = serve(n=50_000)  # a 200 kB parameter buffer: a 100 kB STATS would fit in it
    before = ps.params.tobytes()
    sock = socket.create_connection(tcp.address, timeout=3)
    rx = Receiver(sock)
    rx.recv()
    send_json(sock, Msg.HELLO, {"fingerprint": "toy:50000:abc"}, seq=1)
    assert rx.recv().type == Msg.WELCOME
    sock.sendall(HEADER.pack(MAGIC, PROTOCOL, Msg.STATS, 0, 100_000, 2, 0))
    assert "control frame" in error_of(rx.recv())
    assert ps.params.tobytes() == before


# ------------------------------------------------------------------ 4. the STATS reply

def test_4a_long_names_and_departed_workers_stay_bounded(serve):
    ps, tcp = serve()
    sock, rx = hostile(tcp, name="x" * 65_000)
    sock.close()
    MAX_DEPARTED = registry_module.MAX_DEPARTED
    assert len(ps.workers[1].name) == registry_module.MAX_NAME
    for i in range(MAX_DEPARTED + 20):  # join/leave cycles
        sock, rx = hostile(tcp, name=f"cycle {i}")
        send_json(sock, Msg.BYE, {"reason": "r" * 60_000}, seq=2)
        sock.close()
    # Every cycle's BYE handled (under load the last few arrive after the first 32 departures), then count.
    wait_for(lambda: all(w.left is not None for w in ps.workers.values())
             and sum(w.left is not None for w in ps.workers.values()) == MAX_DEPARTED)
    assert len(ps.workers) <= MAX_DEPARTED + 1
    assert all(len(w.left) <= 200 for w in ps.workers.values() if w.left)
    assert len(json.dumps(ps.stats_reply())) < MAX_JSON
    assert ps.stats()["workers_total"] == MAX_DEPARTED + 21
    assert_serves_a_real_worker(ps, tcp)


def fake_server(script):
    """A one-connection fake server running script(sock) in a thread; returns its address."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        sock, _ = listener.accept()
        try:
            script(sock)
        except (OSError, protocol.ProtocolError):
            pass
        finally:
            sock.close()
            listener.close()

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()


def server_hello(sock, num_params=N, auth=False, nonce=None):
    send_json(sock, Msg.HELLO, {"server": "minasgd", "model": "toy", "num_params": num_params,
                                "nonce": (nonce or os.urandom(16)).hex(), "auth": auth})


def test_4b_a_worker_survives_an_oversized_or_bad_stats_reply():
    def script(sock):
        server_hello(sock)
        rx = Receiver(sock)
        frame = rx.recv()
        send_json(sock, Msg.WELCOME, {"worker_id": 1, "lr": 0.1}, seq=frame.seq)
        frame = rx.recv()  # STATS: answer 70 kB
        send_frame(sock, Msg.STATS, b"{" + b" " * 70_000 + b"}", seq=frame.seq)
        frame = rx.recv()  # STATS: answer garbage
        send_frame(sock, Msg.STATS, b"not json", seq=frame.seq)
        frame = rx.recv()  # PUSH: a normal ACK
        send_json(sock, Msg.ACK, {"version": 1, "steps": 1, "lr": 0.1, "done": False}, seq=frame.seq, version=1)
        rx.recv()

    said = []
    client = TcpClient(fake_server(script), say=said.append, timeout=3)
    client.hello(FP, {}, num_params=N)
    assert client.stats({"loss": 1.0}) == {}
    assert client.stats({"loss": 1.0}) == {}
    assert client.push(np.zeros(N, np.float32), 0)["version"] == 1  # the connection is still in step
    assert len(said) == 2 and "STATS reply" in said[0]
    client.close()


# ------------------------------------------------------------------ 5. finite poison, forged counts

def test_5a_an_update_that_would_overflow_is_refused(serve):
    ps, tcp = serve()
    sock, rx = hostile(tcp)
    big = np.full(N, 1.2e38, np.float32)  # (server momentum 0.9: the second push would move 2.28e38 more)
    assert answer(sock, rx, Msg.PUSH, big, count=1).type == Msg.ACK  # finite, valid, applied
    after_first, velocity = ps.params.tobytes(), ps.optimizer.velocity.copy()
    assert "NaN/Inf" in error_of(answer(sock, rx, Msg.PUSH, big, count=1, version=1))
    assert ps.params.tobytes() == after_first and np.isfinite(ps.params).all()
    assert np.array_equal(ps.optimizer.velocity, velocity) and ps.version == 1
    assert_serves_a_real_worker(ps, tcp)


@pytest.mark.parametrize("count", [3, 65535])
def test_5b_a_push_count_beyond_npush_is_refused(serve, count):
    ps, tcp = serve()  # nsync 2: a worker's push sums at most 2 mini-batches
    before = ps.params.tobytes()
    sock, rx = hostile(tcp)
    assert "at most 2 mini-batches" in error_of(answer(sock, rx, Msg.PUSH, np.zeros(N, np.float32), count=count))
    assert ps.params.tobytes() == before and ps.steps == 0
    assert_serves_a_real_worker(ps, tcp)


def test_5c_a_declared_npush_is_bounded(serve):
    ps, tcp = serve()
    sock = socket.create_connection(tcp.address, timeout=3)
    rx = Receiver(sock)
    rx.recv()
    send_json(sock, Msg.HELLO, {"fingerprint": FP, "npush": 10**6}, seq=1)
    assert "npush" in error_of(rx.recv())
    assert_serves_a_real_worker(ps, tcp)


# ------------------------------------------------------------------ 6. sync rounds

def test_6_a_silent_peer_is_dropped_from_the_sync_round(serve):
    ps, tcp = serve(ps_options={"sync": True, "round_timeout": 0.5}, timeout=30.0)
    ps.expected_workers = 2
    silent, silent_rx = hostile(tcp, name="silent")  # joins, never pushes (until the end)
    client = TcpClient(tcp.address, timeout=4.0)
    client.hello(FP, {"name": "real"})
    params = np.empty(N, np.float32)
    assert client.fetch_into(params) == 0
    t0 = time.monotonic()
    reply = client.push(np.full(N, 1e-3, np.float32), 0, batches=1)
    assert reply["version"] == 1 and time.monotonic() - t0 < 3.0
    assert ps.workers[1].missed_rounds == 1 and ps.workers[1].left is None  # dropped from the round only
    t0 = time.monotonic()
    assert client.push(np.full(N, 1e-3, np.float32), 1, batches=1)["version"] == 2
    assert time.monotonic() - t0 < 0.4  # later rounds do not wait for it
    console = Console(record=True, width=200)
    console.print(ServerDashboard(monitor_for(ps)).render())
    assert "missed 1 sync round" in console.export_text()  # said so on the dashboard
    # It pushes again: its pushes count, and after 2 rounds in a row rounds wait for it again
    # (not at once: a peer pushing every other round would stall every round it skips; issue 22).
    for version in (2, 3):
        assert 1 in ps.round_excused
        replies = []
        thread = threading.Thread(target=lambda: replies.append(answer(
            silent, silent_rx, Msg.PUSH, np.zeros(N, np.float32), count=1, version=version)))
        thread.start()
        wait_for(lambda: 1 in ps.round_members)
        assert client.push(np.full(N, 1e-3, np.float32), version, batches=1)["version"] == version + 1
        thread.join()
        assert replies[0].type == Msg.ACK
    assert 1 not in ps.round_excused and ps.workers[1].round_streak == 2
    client.close()
    silent.close()


# ------------------------------------------------------------------ 7. checkpoints that fail

def test_7_a_failed_checkpoint_warns_and_training_goes_on(serve, tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    ps, tcp = serve(ps_options={"checkpoint_path": path})
    assert ps.checkpoint() == path
    good = path.read_bytes()

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", disk_full)
    monitor = monitor_for(ps)
    ps.last_checkpoint, ps.checkpoint_every = 0.0, 1.0
    monitor.tick()  # due: fails, warns, goes on
    assert ps.checkpoint_failures == 1 and "No space left" in ps.checkpoint_error
    assert monitor.run.records[-1]["kind"] == "warning"
    console = Console(record=True, width=200)
    console.print(ServerDashboard(monitor).render())
    assert "No space left" in console.export_text()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
    assert_serves_a_real_worker(ps, tcp)
    monkeypatch.undo()
    assert ps.checkpoint() == path and ps.checkpoint_error is None  # the next interval succeeds


# ------------------------------------------------------------------ 8. the dashboard

def test_8_peer_strings_are_plain_text_on_the_dashboard(serve):
    ps, tcp = serve()
    sock, _ = hostile(tcp, name="[/evil]")
    send_json(sock, Msg.BYE, {"reason": "[link=https://evil.example]click[/link]"}, seq=2)
    sock.close()
    hostile(tcp, name="[bold red]x[/]")
    wait_for(lambda: ps.workers[1].left is not None)
    console = Console(record=True, width=200, force_terminal=True, color_system="truecolor")
    console.print(ServerDashboard(monitor_for(ps)).render())
    text = console.export_text()
    assert "[/evil]" in text and "[link=https://evil.example]click[/link]" in text and "[bold red]x[/]" in text
    assert "\x1b]8;" not in console.export_text(styles=True)  # no terminal hyperlink
    assert_serves_a_real_worker(ps, tcp)


# ------------------------------------------------------------------ 9. ERROR frames, never tracebacks

def test_9a_deeply_nested_json_gets_an_error_frame(serve):
    ps, tcp = serve()
    sock, rx = hostile(tcp)
    assert "nested too deeply" in error_of(answer(sock, rx, Msg.STATS, b"[" * 30_000))
    assert ps.rejected == 1
    assert_serves_a_real_worker(ps, tcp)


def test_9b_a_non_ascii_hmac_gets_an_error_frame(serve):
    ps, tcp = serve(token=TOKEN)
    sock = socket.create_connection(tcp.address, timeout=3)
    rx = Receiver(sock)
    rx.recv()
    send_json(sock, Msg.HELLO, {"fingerprint": FP, "hmac": "\u00e9" * 64}, seq=1)
    assert "token" in error_of(rx.recv())
    assert ps.rejected == 1
    assert_serves_a_real_worker(ps, tcp, token=TOKEN)


# ------------------------------------------------------------------ 10. workers do not trust any server

def test_10a_a_worker_bounds_what_it_accepts_from_hello():
    tracemalloc.start()
    try:
        address = fake_server(lambda sock: (server_hello(sock, num_params=50_000_000), sock.recv(1 << 16)))
        client = TcpClient(address, timeout=3)
        with pytest.raises(ServerError, match="50,000,000 parameters"):
            client.hello(FP, {}, num_params=N)
        assert tracemalloc.get_traced_memory()[1] < 10 * 2**20, "the worker allocated what a fake server said"
    finally:
        tracemalloc.stop()
    address = fake_server(lambda sock: send_json(sock, Msg.HELLO, {"num_params": 10**12, "nonce": "00" * 16}))
    with pytest.raises(ServerError, match="not a minasgd server"):
        TcpClient(address, timeout=3)


def test_10b_with_a_token_the_server_must_prove_it_too():
    def no_auth(sock):  # a rogue server that does not ask for the token
        server_hello(sock, auth=False)
        rx = Receiver(sock)
        frame = rx.recv()
        send_json(sock, Msg.WELCOME, {"worker_id": 1, "lr": 0.1}, seq=frame.seq)
        rx.recv()

    def wrong_proof(sock):  # asks for it, but cannot answer our nonce
        server_hello(sock, auth=True)
        rx = Receiver(sock)
        frame = rx.recv()
        send_json(sock, Msg.WELCOME, {"worker_id": 1, "lr": 0.1, "proof": "0" * 64}, seq=frame.seq)
        rx.recv()

    with pytest.raises(ServerError, match="does not ask for the token"):
        TcpClient(fake_server(no_auth), TOKEN, timeout=3).hello(FP, {})
    with pytest.raises(ServerError, match="could not prove"):
        TcpClient(fake_server(wrong_proof), TOKEN, timeout=3).hello(FP, {})


def test_10c_the_real_server_proves_the_token(serve):
    ps, tcp = serve(token=TOKEN)
    assert_serves_a_real_worker(ps, tcp, token=TOKEN)
    with pytest.raises(ServerError, match="token"):
        TcpClient(tcp.address, "wrong", timeout=3).hello(FP, {})
    assert tcp_module.server_proof(TOKEN, b"a" * 16, b"b" * 16) != token_hmac(TOKEN, b"a" * 16)


# ------------------------------------------------------------------ 11. bounded echoes, file permissions

def test_11a_echoed_reasons_are_bounded(serve):
    ps, tcp = serve()
    sock = socket.create_connection(tcp.address, timeout=3)
    rx = Receiver(sock)
    rx.recv()
    send_json(sock, Msg.HELLO, {"fingerprint": "f" * 60_000}, seq=1)
    assert len(error_of(rx.recv())) <= 200
    assert all(len(text) <= 300 for _, text in ps.recent_events(10))
    assert_serves_a_real_worker(ps, tcp)


def test_11b_model_npz_keeps_normal_permissions(tmp_path):
    path = checkpoint.save(tmp_path / "model.npz", "toy", FP, np.zeros(3, np.float32))
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


# ------------------------------------------------------------------ the attacks that were already refused

def raw(msg=Msg.PUSH, magic=MAGIC, protocol=PROTOCOL, count=1, length=4 * N, seq=2, version=0):
    return struct.pack("<4sBBHQQQ", magic, protocol, msg, count, length, seq, version)


GOOD = np.zeros(N, np.float32).tobytes()


@pytest.mark.parametrize("data", [
    b"\x00" * 32, raw(magic=b"EVIL") + GOOD, raw(protocol=99) + GOOD, raw(msg=200) + GOOD,
    raw(length=2**62), raw(length=8) + b"\x00" * 8, raw() + GOOD[:100],
    raw() + np.full(N, np.nan, np.float32).tobytes(), raw(version=99) + GOOD, raw(count=0) + GOOD,
    raw(msg=Msg.STATS, length=20) + b"\x80\x04\x95pickle!\x00\x00\x00\x00\x00\x00\x00",
    raw(msg=Msg.HELLO, length=2) + b"{}", raw(msg=Msg.PARAMS) + GOOD,
], ids=["garbage", "magic", "protocol", "type", "huge", "short", "truncated", "nan", "future", "zero count",
        "pickle", "replayed hello", "params"])
def test_known_malformed_frames(serve, data):
    ps, tcp = serve()
    before = ps.params.tobytes()
    sock, rx = hostile(tcp)
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    try:
        frame = rx.recv()
        assert frame.type == Msg.ERROR
    except protocol.ConnectionClosed:
        pass  # a truncated frame: the server just sees the hang-up
    sock.close()
    wait_for(lambda: ps.workers[1].left is not None)
    assert ps.params.tobytes() == before and ps.version == 0
    assert_serves_a_real_worker(ps, tcp)


def test_wrong_token_and_replayed_proof_are_refused(serve):
    ps, tcp = serve(token=TOKEN)
    sock = socket.create_connection(tcp.address, timeout=3)
    rx = Receiver(sock)
    old_nonce = bytes.fromhex(rx.recv().json()["nonce"])
    send_json(sock, Msg.HELLO, {"fingerprint": FP, "hmac": token_hmac("guess", old_nonce)}, seq=1)
    assert "token" in error_of(rx.recv())
    sock = socket.create_connection(tcp.address, timeout=3)  # replay a proof for an old nonce
    rx = Receiver(sock)
    rx.recv()
    send_json(sock, Msg.HELLO, {"fingerprint": FP, "hmac": token_hmac(TOKEN, old_nonce)}, seq=1)
    assert "token" in error_of(rx.recv())
    assert_serves_a_real_worker(ps, tcp, token=TOKEN)
    assert math.isfinite(ps.params.sum())


# ------------------------------------------------------------------ 2, for real; and the bench

SERVER_UNDER_ULIMIT = """
import resource, sys, numpy as np
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from minasgd.ps.server import ParameterServer
from minasgd.ps.tcp import TcpServer, listen
ps = ParameterServer(np.arange(1000, dtype=np.float32) / 1000, model_name="toy", fingerprint="toy:1000:abc",
                     total_steps=10**6, lr=0.1, worker_config={"nsync": 2})
tcp = TcpServer(ps, listen("127.0.0.1", 0)).start()
print(tcp.address[1], flush=True)
sys.stdin.readline()
print("accepting" if tcp.thread.is_alive() else "accept loop died", flush=True)
tcp.close()
"""


def test_2b_accept_loop_survives_a_real_file_descriptor_limit():
    import subprocess
    import sys

    server = subprocess.Popen([sys.executable, "-c", SERVER_UNDER_ULIMIT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        idle = [socket.create_connection(("127.0.0.1", port), timeout=3) for _ in range(80)]  # > 64 files
        time.sleep(0.3)
        for sock in idle:
            sock.close()
        client = TcpClient(("127.0.0.1", port), timeout=3, connect_timeout=3)  # after the EMFILE storm
        client.hello(FP, {"name": "real"})
        params = np.empty(N, np.float32)
        assert client.fetch_into(params) == 0 and client.push(np.zeros(N, np.float32), 0, 1)["version"] == 1
        client.close()
        server.stdin.write("\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "accepting"
    finally:
        server.kill()
        server.wait()


def test_bench_hostile_measures_both_rates():
    from minasgd.ps.bench import hostile

    result = hostile(1000, workers=1, idle=20, malformed=6, seconds=0.3, rounds=1)
    assert result["held"] == 20 and result["malformed_answered"] >= 4
    assert result["rate_undisturbed"] > 0 and result["rate_under_attack"] > 0 and result["ratio"] > 0


def test_8b_a_servers_error_text_is_plain_text_on_the_command_line(capsys):
    from minasgd.cli import main

    address = fake_server(lambda sock: send_json(sock, Msg.ERROR, {"error": "[/evil] [link=https://x.example]y"}))
    host, port = address
    assert main(["work", "--server", f"{host}:{port}", "--backend", "numpy", "--connect-timeout", "2"]) == 2
    out = capsys.readouterr().out
    assert "[/evil] [link=https://x.example]y" in out.replace("\n", "")


@pytest.mark.parametrize("ack", [b"not json", b'{"version": 1}', b'{"version": 1, "steps": 1, "lr": 1e999, "done": false}', b'{"version": 1, "steps": -1, "lr": 0.1, "done": false}'])
def test_4c_a_bad_ack_is_one_clear_line(ack):
    def script(sock):
        server_hello(sock)
        rx = Receiver(sock)
        frame = rx.recv()
        send_json(sock, Msg.WELCOME, {"worker_id": 1, "lr": 0.1}, seq=frame.seq)
        frame = rx.recv()
        send_frame(sock, Msg.ACK, ack, seq=frame.seq)
        rx.recv()

    client = TcpClient(fake_server(script), timeout=3)
    client.hello(FP, {})
    with pytest.raises(ServerError, match="bad"):
        client.push(np.zeros(N, np.float32), 0)
    client.close()


def test_1b_a_real_worker_sends_only_known_stats(serve):
    ps, tcp = serve()
    client = TcpClient(tcp.address, timeout=3)
    client.hello(FP, {"name": "newer worker"})
    assert client.stats({"loss": 0.5, "a_number_this_server_does_not_know": 1})["rejected"] == 0
    assert ps.workers[1].report == {"loss": 0.5, "reconnects": 0}
    client.close()

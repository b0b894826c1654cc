"""The server over real sockets on 127.0.0.1: the conversation, and every bad input refused
with the parameters bit-identical before and after."""

import socket
import time

import numpy as np
import pytest

from minasgd.ps.protocol import HEADER, MAGIC, PROTOCOL, ConnectionClosed, Msg, Receiver, send_frame, send_json
from minasgd.ps.server import ParameterServer
from minasgd.ps.tcp import ServerError, TcpClient, TcpServer, listen, parse_address, token_hmac

N = 1000
FP = "toy:1000:abc"


@pytest.fixture
def server(request):
    token = getattr(request, "param", None)
    ps = ParameterServer(np.arange(N, dtype=np.float32) / N, model_name="toy", fingerprint=FP, total_steps=10**6,
                         lr=0.1, worker_config={"batch_size": 8, "nsync": 2})
    tcp = TcpServer(ps, listen("127.0.0.1", 0), token=token, timeout=1.5).start()
    yield ps, tcp
    tcp.close()


def address(tcp):
    return "%s:%d" % tcp.address


def raw_worker(tcp, fingerprint=FP, token=None):
    """A hand-driven worker: connected and past the handshake; returns (sock, receiver)."""
    sock = socket.create_connection(tcp.address, timeout=5)
    rx = Receiver(sock, max_payload=4 * N)
    hello = rx.recv().json()
    body = {"fingerprint": fingerprint}
    if token:
        body["hmac"] = token_hmac(token, bytes.fromhex(hello["nonce"]))
    send_json(sock, Msg.HELLO, body, seq=1)
    return sock, rx


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_parse_address():
    assert parse_address("10.0.0.1:5555") == ("10.0.0.1", 5555)
    assert parse_address(":80") == ("127.0.0.1", 80)
    assert parse_address("[::1]:7") == ("::1", 7)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_address("localhost")


def test_fetch_push_stats_bye(server):
    ps, tcp = server
    client = TcpClient(address(tcp))
    assert client.server_hello["model"] == "toy" and client.num_params == N
    config = client.hello(FP, {"name": "test"})
    assert config["worker_id"] == 1 and config["nsync"] == 2 and config["mode"] == "async"
    params = np.empty(N, np.float32)
    assert client.fetch_into(params) == 0
    assert params.tobytes() == ps.params.tobytes()
    reply = client.push(np.ones(N, np.float32), 0, batches=2)
    assert reply["version"] == 1 and not reply["done"] and ps.steps == 2
    stats = client.stats({"loss": 1.25, "images_per_second": 10.0})
    assert stats["pushes"] == 1 and stats["staleness"] == {"0": 1}
    assert stats["workers"][0]["loss"] == 1.25
    client.close("finished")
    wait_for(lambda: ps.workers[1].left is not None)
    assert ps.workers[1].left == "finished" and ps.rejected == 0


def test_fetch_after_training_is_over_says_bye(server):
    ps, tcp = server
    client = TcpClient(address(tcp))
    client.hello(FP)
    ps.stop()
    assert client.fetch_into(np.empty(N, np.float32)) is None


# ------------------------------------------------------------------ bad input, one at a time

def header(msg=Msg.PUSH, magic=MAGIC, protocol=PROTOCOL, length=4 * N, count=1, version=0):
    return HEADER.pack(magic, protocol, msg, count, length, 2, version)


NAN = np.r_[np.ones(N - 1), np.nan].astype(np.float32).tobytes()
INF = np.r_[np.ones(N - 1), -np.inf].astype(np.float32).tobytes()
GOOD = np.ones(N, np.float32).tobytes()

BAD_FRAMES = {
    "bad magic": (header(magic=b"EVIL") + GOOD, "bad magic"),
    "bad protocol version": (header(protocol=99) + GOOD, "protocol version 99"),
    "length too big": (header(length=1 << 40), "more than the"),
    "payload of the wrong size": (header(length=4 * N - 4) + GOOD[:-4], "expected 4000"),
    "NaN gradient": (header() + NAN, "NaN/Inf"),
    "Inf gradient": (header() + INF, "NaN/Inf"),
    "zero mini-batches": (header(count=0) + GOOD, "at least one mini-batch"),
    "version from the future": (header(version=5) + GOOD, "server is at 0"),
    "unknown message type": (header(msg=77, length=0), "unknown message type 77"),
    "server-only message": (header(msg=Msg.PARAMS, length=0), "may not send PARAMS"),
    "JSON that is not an object": (header(msg=Msg.STATS, length=2) + b"[]", "JSON object"),
}


@pytest.mark.parametrize("name", BAD_FRAMES)
def test_bad_frame_is_refused_and_params_untouched(server, name):
    ps, tcp = server
    frame, message = BAD_FRAMES[name]
    sock, rx = raw_worker(tcp)
    assert rx.recv().type == Msg.WELCOME
    before = ps.params.tobytes()
    sock.sendall(frame)
    reply = rx.recv()
    assert reply.type == Msg.ERROR and message in reply.json()["error"]
    with pytest.raises((ConnectionClosed, ConnectionResetError)):
        rx.recv()  # the server hung up on this worker
    sock.close()
    assert ps.params.tobytes() == before and ps.version == 0
    wait_for(lambda: ps.workers[1].left is not None)
    assert ps.rejected == 1 and ps.workers[1].left.startswith("rejected")
    # ... and the server still serves everyone else
    client = TcpClient(address(tcp))
    client.hello(FP)
    assert client.push(np.ones(N, np.float32), 0)["version"] == 1
    client.close()


def test_wrong_fingerprint_is_refused_on_both_sides(server):
    ps, tcp = server
    client = TcpClient(address(tcp))
    with pytest.raises(ServerError, match="model mismatch: the worker has other:1000:zzz, the server has toy:1000:abc"):
        client.hello("other:1000:zzz")
    assert ps.rejected == 1 and not ps.workers
    assert "model mismatch" in ps.recent_events(1)[0][1]


@pytest.mark.parametrize("server", ["s3cret"], indirect=True)
def test_token_is_checked_with_hmac(server):
    ps, tcp = server
    with pytest.raises(ServerError, match="needs a token"):
        TcpClient(address(tcp)).hello(FP)  # refused on the worker side before sending anything
    with pytest.raises(ServerError, match="wrong or missing token"):
        TcpClient(address(tcp), token="guess").hello(FP)
    sock, rx = raw_worker(tcp)  # a hand-made HELLO without any hmac
    assert rx.recv().json()["error"] == "wrong or missing token"
    sock.close()
    assert TcpClient(address(tcp), token="s3cret").hello(FP)["worker_id"] == 1
    wait_for(lambda: ps.rejected == 2)


def test_a_silent_worker_is_dropped_after_the_timeout(server):
    ps, tcp = server
    sock, rx = raw_worker(tcp)
    assert rx.recv().type == Msg.WELCOME
    wait_for(lambda: ps.workers[1].left is not None, seconds=5)
    assert "timed out" in ps.workers[1].left
    sock.close()


def test_a_worker_that_resets_the_connection_is_dropped(server):
    ps, tcp = server
    sock, rx = raw_worker(tcp)
    assert rx.recv().type == Msg.WELCOME
    send_frame(sock, Msg.FETCH, seq=2)
    rx.recv()
    sock.sendall(header()[:10])  # half a header, then a hard reset
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()
    wait_for(lambda: ps.workers[1].left is not None)
    assert ps.rejected == 0 and ps.version == 0


def test_port_in_use_is_one_clear_line():
    taken = listen("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(OSError) as e:
            listen("127.0.0.1", port)
        assert str(e.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"
    finally:
        taken.close()


def test_public_address_needs_a_token():
    with pytest.raises(ValueError, match="without --token"):
        listen("0.0.0.0", 0)
    listen("0.0.0.0", 0, token="t").close()

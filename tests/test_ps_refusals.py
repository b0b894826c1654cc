"""Refusals travel as a code (`protocol.REFUSED`, FINISHED, STOPPING, SERVER_FULL), and a client
decides what to do from the code alone: never from the words, which may quote a peer's strings."""

import json

import numpy as np
import pytest

from minasgd.ps import protocol
from minasgd.ps.protocol import Frame, Msg, read_error
from minasgd.ps.server import ParameterServer
from minasgd.ps.session import ConnectionLost, ServerError, refusal
from minasgd.ps.tcp import TcpClient, TcpServer, listen

N = 100
FP = "toy:100:abc"


def error_frame(body):
    return Frame(Msg.ERROR, 0, 1, 0, memoryview(json.dumps(body).encode()))


def test_read_error_takes_only_a_known_code():
    assert read_error({"error": "server full: 3 connections", "code": "server_full"}) == ("server_full", "server full: 3 connections")
    assert read_error({"error": "x"}) == ("refused", "x")  # no code: a plain refusal
    assert read_error({"error": "x", "code": "retry_please"})[0] == "refused"  # an unknown code
    assert read_error({"error": "x", "code": ["stopping"]})[0] == "refused"  # not even a string
    assert read_error(["stopping"])[0] == "refused"


@pytest.mark.parametrize("code, kind", [("stopping", ConnectionLost), ("server_full", ConnectionLost),
                                        ("finished", ServerError), ("refused", ServerError)])
def test_the_code_decides_the_exception(code, kind):
    error = refusal(error_frame({"error": "whatever it says", "code": code}), "rank 0 refused us")
    assert type(error) is kind and error.code == code and str(error) == "rank 0 refused us: whatever it says"


def test_words_that_look_like_another_refusal_change_nothing():
    """The attack on the old substring match: a refusal whose text quotes a peer string that says
    "server stopping" / "training is already finished" stays a plain refusal."""
    for text in ("server stopping: reconnect", "server full: try later",
                 "model mismatch: the worker has training is already finished, the server has toy"):
        error = refusal(error_frame({"error": text, "code": "refused"}), "refused")
        assert type(error) is ServerError and error.code == "refused"
    unreadable = refusal(Frame(Msg.ERROR, 0, 1, 0, memoryview(b"{not json")), "refused")
    assert type(unreadable) is ServerError and unreadable.code == "refused"


def test_a_real_server_sends_the_codes():
    ps = ParameterServer(np.zeros(N, np.float32), model_name="toy", fingerprint=FP, total_steps=1)
    tcp = TcpServer(ps, listen("127.0.0.1", 0), timeout=2.0, max_connections=1).start()
    try:
        address = "%s:%d" % tcp.address
        first = TcpClient(address, timeout=5)
        first.hello(FP, {"name": "first"})
        with pytest.raises(ConnectionLost) as full:  # one connection allowed: the second is told to come back
            TcpClient(address, timeout=5, connect_timeout=2)
        assert full.value.code == "server_full"
        first.close()
        ps.stop()  # training over: a joining worker hears FINISHED
        late = TcpClient(address, timeout=5)
        with pytest.raises(ServerError) as finished:
            late.hello(FP, {"name": "late"})
        assert finished.value.code == "finished" and "training is already finished" in str(finished.value)
        late.close()
        with pytest.raises(ServerError) as mismatch:  # whose words quote our fingerprint
            TcpClient(address, timeout=5).hello("training is already finished", {})
        assert mismatch.value.code == "refused"
    finally:
        tcp.close()


def test_a_server_stopping_early_says_stopping():
    ps = ParameterServer(np.zeros(N, np.float32), model_name="toy", fingerprint=FP, total_steps=100)
    tcp = TcpServer(ps, listen("127.0.0.1", 0), timeout=2.0).start()
    try:
        ps.stop(interrupted=True)
        client = TcpClient("%s:%d" % tcp.address, timeout=5)
        with pytest.raises(ConnectionLost) as stopping:
            client.hello(FP, {})
        assert stopping.value.code == "stopping"
    finally:
        tcp.close()

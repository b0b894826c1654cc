"""The parameter server's wire format: frames round-trip, and every malformed frame is refused."""

import socket
import struct

import numpy as np
import pytest

from minasgd.ps.protocol import (HEADER, MAGIC, PROTOCOL, ConnectionClosed, Msg, ProtocolError, Receiver,
                                 send_frame, send_json)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_header_is_32_bytes_little_endian():
    assert HEADER.size == 32
    raw = HEADER.pack(MAGIC, PROTOCOL, Msg.PUSH, 4, 40, 7, 3)
    assert raw[:4] == b"MASG" and raw[5] == Msg.PUSH
    assert struct.unpack_from("<Q", raw, 8)[0] == 40 and struct.unpack_from("<Q", raw, 24)[0] == 3


def test_float_payload_round_trips_bit_exactly(pair):
    a, b = pair
    vec = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    vec[3] = -0.0
    send_frame(a, Msg.PUSH, vec, seq=5, version=9, count=4)
    frame = Receiver(b, max_payload=4 * vec.size).recv()
    assert (frame.type, frame.seq, frame.version, frame.count) == (Msg.PUSH, 5, 9, 4)
    got = frame.floats(vec.size)
    assert got.tobytes() == vec.tobytes()


def test_receive_lands_in_the_preallocated_buffer(pair):
    a, b = pair
    rx = Receiver(b, max_payload=400)
    buffer = rx.buffer
    send_frame(a, Msg.PARAMS, np.ones(100, np.float32))
    frame = rx.recv()
    assert frame.payload.obj is buffer.obj  # a view of the same bytearray: no new allocation
    assert np.frombuffer(buffer[:400], np.float32).sum() == 100


def test_json_round_trip_and_empty_body(pair):
    a, b = pair
    send_json(a, Msg.STATS, {"loss": 1.5, "name": "w"}, seq=2)
    send_frame(a, Msg.FETCH, seq=3)
    rx = Receiver(b)
    assert rx.recv().json() == {"loss": 1.5, "name": "w"}
    frame = rx.recv()
    assert frame.type == Msg.FETCH and frame.json() == {} and len(frame.payload) == 0


def test_send_refuses_a_vector_that_is_not_float32(pair):
    with pytest.raises(ValueError, match="float32"):
        send_frame(pair[0], Msg.PUSH, np.ones(4, np.float64))


def _raw(sock, magic=MAGIC, protocol=PROTOCOL, msg=Msg.FETCH, count=0, length=0, seq=0, version=0, body=b""):
    sock.sendall(HEADER.pack(magic, protocol, msg, count, length, seq, version) + body)


@pytest.mark.parametrize("fields, message", [
    ({"magic": b"XXXX"}, "bad magic"),
    ({"protocol": PROTOCOL + 1}, "protocol version"),
    ({"msg": 200}, "unknown message type 200"),
    ({"length": 1 << 40}, "more than the"),
])
def test_malformed_headers_are_refused(pair, fields, message):
    a, b = pair
    _raw(a, **fields)
    with pytest.raises(ProtocolError, match=message):
        Receiver(b, max_payload=1024).recv()


def test_wrong_payload_size_and_bad_json_are_refused(pair):
    a, b = pair
    send_frame(a, Msg.PUSH, np.ones(3, np.float32))
    send_frame(a, Msg.STATS, b"[1, 2]")
    send_frame(a, Msg.STATS, b"\xff{")
    rx = Receiver(b)
    with pytest.raises(ProtocolError, match="carries 12 bytes, expected 16"):
        rx.recv().floats(4)
    with pytest.raises(ProtocolError, match="JSON object"):
        rx.recv().json()
    with pytest.raises(ProtocolError, match="not valid JSON"):
        rx.recv().json()


def test_eof_mid_frame_is_connection_closed(pair):
    a, b = pair
    _raw(a, msg=Msg.PUSH, length=100, body=b"\0" * 10)
    a.close()
    with pytest.raises(ConnectionClosed, match="middle of a frame"):
        Receiver(b).recv()

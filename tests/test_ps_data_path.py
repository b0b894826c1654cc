"""The parameter server's data path: frames sent with sendmsg, fetches served from a shared snapshot."""

import socket
import threading

import numpy as np

from minasgd.ps.protocol import Msg, Receiver, send_frame, send_parts
from minasgd.ps.server import ParameterServer


class TrickleSocket:
    """A socket whose sendmsg sends at most `chunk` bytes per call, as a full kernel buffer does."""

    def __init__(self, chunk):
        self.chunk, self.out = chunk, bytearray()

    def sendmsg(self, buffers):
        budget = self.chunk
        for b in buffers:
            take = bytes(b[:budget])
            self.out += take
            budget -= len(take)
            if not budget:
                break
        return self.chunk - budget

    def sendall(self, data):
        data = memoryview(data)
        while len(data):
            data = data[self.sendmsg([data]):]


def test_send_parts_survives_partial_sends():
    parts = [b"head", np.arange(1000, dtype=np.float32), b"", b"tail"]
    want = b"head" + parts[1].tobytes() + b"tail"
    for chunk in (1, 3, 7, 4000, 10**6):
        sock = TrickleSocket(chunk)
        send_parts(sock, parts)
        assert bytes(sock.out) == want, chunk


def test_a_big_frame_arrives_whole_over_a_real_socket():
    a, b = socket.socketpair()
    vec = np.random.default_rng(0).standard_normal(3_000_001).astype(np.float32)  # > any socket buffer
    sender = threading.Thread(target=send_frame, args=(a, Msg.PARAMS, vec), kwargs={"seq": 5, "version": 9})
    sender.start()
    out = np.empty_like(vec)
    frame = Receiver(b, max_payload=vec.nbytes).recv(into=memoryview(out).cast("B"))
    sender.join()
    assert (frame.type, frame.seq, frame.version) == (Msg.PARAMS, 5, 9)
    np.testing.assert_array_equal(out, vec)
    a.close(), b.close()


def make_ps(total_steps=100):
    return ParameterServer(np.arange(6, dtype=np.float32), model_name="m", fingerprint="fp",
                           total_steps=total_steps, lr=0.5, momentum=0.0)


def test_fetches_of_one_version_share_one_read_only_snapshot_and_an_update_swaps_it():
    ps = make_ps()
    wid = ps.join("fp", {})
    with ps.fetch_snapshot(wid) as (first, version, done), ps.fetch_snapshot(wid) as (again, _, _):
        assert again is first and first is ps.params and not first.flags.writeable and not done
        kept = first.copy()
        ps.push(wid, np.ones(6, np.float32), version)
        with ps.fetch_snapshot(wid) as (after, new_version, _):
            assert new_version == version + 1 and after is not first
        for _ in range(3):  # more updates while the first fetch is still sending: it is never written
            ps.push(wid, np.zeros(6, np.float32), ps.version)
        np.testing.assert_array_equal(first, kept)  # whoever still sends the old one sends what it fetched
    np.testing.assert_array_equal(ps.params, kept - 1.0)  # a push is the displacement, applied as it is (issue 20)
    out = np.empty(6, np.float32)
    assert ps.fetch_into(wid, out)[0] == version + 4
    np.testing.assert_array_equal(out, ps.params)
    assert ps.fetches == 4


def test_an_update_reuses_the_vector_of_a_version_nobody_sends_any_more():
    ps = make_ps(total_steps=10**9)  # a flat lr
    wid = ps.join("fp", {})
    vectors = set()
    for _ in range(6):
        with ps.fetch_snapshot(wid) as (params, version, _):
            vectors.add(id(params))
        ps.push(wid, np.ones(6, np.float32), version)
    assert len(vectors) == 2  # two vectors, taking turns: no allocation per update
    np.testing.assert_array_equal(ps.params, np.arange(6) - 6 * 1.0)  # six displacements of 1 (issue 20)

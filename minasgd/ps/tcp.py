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

Three modules: the server here (TcpServer), its accept thread and handshakes (`tcp_accept`), and
the worker's side (`tcp_client.TcpClient`, named here too; it imports nothing of the server's).
All the rules live in `ParameterServer` and what the messages mean in `minasgd.ps.session` (the
request loop, the client's requests, the token proofs); these modules only move frames
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
import math
import selectors
import socket
import threading
import time

from .protocol import (REFUSED, STOPPING_TEXT, ConnectionClosed, Msg, ProtocolError, Receiver, Refused, Stopping, clip,
                       error_body, send_frame, send_json)
from .session import ConnectionLost, ServerError, same_digest, serve_requests, server_proof, token_hmac
from .tcp_accept import Acceptor
from .tcp_client import TcpClient, parse_address

__all__ = ["TcpServer", "TcpClient", "listen", "parse_address", "is_loopback", "ServerError", "ConnectionLost",
           "token_hmac", "server_proof", "same_digest"]  # the last five live in `session`, named here too

LISTEN_BACKLOG = 1024  # connections the kernel queues before accept() (a full queue drops a SYN: a 1 s retry)


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

class TcpServer(Acceptor):
    """A `ParameterServer` behind a socket: the accept thread and its handshakes (`Acceptor`),
    then one thread per worker, serving its requests (`session.serve_requests`)."""


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

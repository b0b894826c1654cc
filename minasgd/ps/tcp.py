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

No client can stop or starve the server: at most `max_connections` connections at once (more
are refused with a clear ERROR); a connection gets `handshake_timeout` seconds IN TOTAL to
finish its HELLO, and only then a parameter-sized buffer; control frames are bounded to
64 KiB; when accept() fails (too many open files) the accept loop backs off and goes on, and a
connection whose thread cannot start is dropped alone. Every connection has a timeout, so a
stuck worker is dropped, and any frame the server rejects ends that worker's connection only.

A worker's client checks what the server sends (sizes, fields) and, given `reconnect` seconds,
reconnects with backoff when the server goes away (a restarted `minasgd serve --resume`).
"""

import errno
import ipaddress
import os
import socket
import sys
import threading
import time

from .protocol import ConnectionClosed, Msg, ProtocolError, Receiver, clip, send_frame, send_json
from .server import FINISHED, SERVER_FULL, STOPPING, Refused, Stopping
from .session import (RETRY_LATER, Client, ConnectionLost, ServerError, error_of, same_digest, serve_requests,
                      server_proof, token_hmac)

__all__ = ["TcpServer", "TcpClient", "listen", "parse_address", "is_loopback", "ServerError", "ConnectionLost",
           "token_hmac", "server_proof", "same_digest"]  # the last five live in `session`, named here too

MAX_PARAMS = 2**31  # the most parameters a worker believes a server's HELLO about
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
        return socket.create_server((host, port))
    except OSError as e:
        reason = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e)).lower()
        raise OSError(f"cannot listen on {host}:{port}: {reason}") from None


# ------------------------------------------------------------------ server side

class TcpServer:
    def __init__(self, ps, listener, token=None, timeout=120.0, max_connections=256, handshake_timeout=10.0):
        """Serve `ps` on `listener`, a listening socket from `listen()`."""
        self.ps, self.token, self.timeout = ps, token, timeout
        self.max_connections, self.handshake_timeout = max_connections, handshake_timeout
        self.refused = 0  # connections turned away at the door (too many)
        self.sock = listener
        self.sock.settimeout(0.5)  # so the accept loop notices close() within half a second
        self.address = self.sock.getsockname()[:2]
        self.connections = {}  # socket -> its thread
        self.lock = threading.Lock()
        self.closing = False
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
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        except OSError:
            pass
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
        if self.thread.is_alive():
            self.thread.join(timeout=2.0)

    def _accept_loop(self):
        """Accept until close(). Nothing a client does ends this loop: out of file descriptors, it
        waits (doubling up to a second) and tries again; a thread that cannot start loses only its
        connection; beyond `max_connections` a newcomer gets ERROR and is hung up on at once."""
        pause = 0.0
        while not self.closing:
            try:
                sock, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self.closing:
                    return  # the listening socket was closed
                pause = min(1.0, max(0.01, 2 * pause))
                if e.errno in ACCEPT_ERRORS:
                    self.ps.log(f"accept failed ({e.strerror or e}); retrying in {pause:g} s")
                time.sleep(pause)
                continue
            pause = 0.0
            self._admit(sock, peer)

    def _admit(self, sock, peer):
        """Give a new connection its thread, or refuse it (full, or no thread to be had)."""
        with self.lock:
            full = len(self.connections) >= self.max_connections
        if full:
            self.refused += 1
            self.ps.reject(f"{peer[0]}:{peer[1]}", f"server full ({self.max_connections} connections)")
            try:
                sock.settimeout(0.1)
                send_json(sock, Msg.ERROR, {"error": f"{SERVER_FULL}: {self.max_connections} connections; try later"})
            except OSError:
                pass
            sock.close()
            return
        thread = threading.Thread(target=self._serve_connection, args=(sock, peer),
                                  name=f"ps-conn-{peer[0]}:{peer[1]}", daemon=True)
        with self.lock:
            self.connections[sock] = thread
        try:
            thread.start()
        except RuntimeError as e:  # "can't start new thread": drop this connection only
            with self.lock:
                self.connections.pop(sock, None)
            self.ps.reject(f"{peer[0]}:{peer[1]}", f"no thread for it ({e})")
            sock.close()

    def _serve_connection(self, sock, peer):
        """One worker, from HELLO to BYE. Whatever goes wrong ends this connection only."""
        who = f"{peer[0]}:{peer[1]}"
        worker_id, reason = None, "connection closed"
        rx = Receiver(sock)  # control frames only until the handshake is done
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            worker_id = self._handshake(sock, rx)
            who = f"worker {worker_id}"
            sock.settimeout(self.timeout)
            rx.resize(4 * self.ps.num_params)
            reason = self._serve_requests(sock, rx, worker_id)
        except Stopping as e:  # stopping before training is over: not the worker's fault
            reason = STOPPING
            self._refuse(sock, str(e))
        except (Refused, ProtocolError, ValueError, TypeError, RecursionError, OverflowError) as e:
            if isinstance(e, ConnectionClosed):
                reason = "connection closed" if worker_id is None else f"hung up ({e})"
            else:
                error = clip(e if isinstance(e, (Refused, ProtocolError)) else f"bad request ({type(e).__name__})")
                reason = f"rejected: {error}"
                self.ps.reject(who, error)
                self._refuse(sock, error)
        except TimeoutError:
            reason = (f"silent for {self.timeout:g} s (timed out)" if worker_id is not None else
                      f"no HELLO within {self.handshake_timeout:g} s")
            if worker_id is None:
                self.ps.reject(who, reason)
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

    def _refuse(self, sock, error):
        """Send ERROR, then read and drop whatever the peer still sends for up to a second.

        Closing a socket with unread data makes the kernel reset the connection, which can
        destroy the ERROR frame before the peer reads it; draining first avoids that.
        """
        try:
            send_json(sock, Msg.ERROR, {"error": clip(error)})
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.1)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def _handshake(self, sock, rx):
        """HELLO both ways within `handshake_timeout` seconds in all; returns the worker's id."""
        deadline = time.monotonic() + self.handshake_timeout
        sock.settimeout(self.handshake_timeout)
        nonce = os.urandom(16)
        send_json(sock, Msg.HELLO, {"server": "minasgd", "model": self.ps.model_name,
                                    "num_params": self.ps.num_params, "nonce": nonce.hex(),
                                    "auth": bool(self.token)})
        frame = rx.recv(deadline=deadline)
        if frame.type != Msg.HELLO:
            raise ProtocolError(f"expected HELLO, got {frame.type.name}")
        hello = frame.json()
        proof = None
        if self.token:
            if not same_digest(hello.get("hmac"), token_hmac(self.token, nonce)):
                raise Refused("wrong or missing token")
            client_nonce = hello.get("nonce")
            if isinstance(client_nonce, str) and len(client_nonce) == 32:
                try:
                    proof = server_proof(self.token, nonce, bytes.fromhex(client_nonce))
                except ValueError:
                    raise Refused("the worker's nonce is not 16 bytes of hex") from None
        worker_id = self.ps.join(hello.get("fingerprint"), hello)
        welcome = self.ps.welcome(worker_id)
        if proof:
            welcome["proof"] = proof
        try:
            send_json(sock, Msg.WELCOME, welcome, seq=frame.seq)
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
        self._open(connect_timeout)

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
        if frame.type == Msg.ERROR:
            error = clip(error_of(frame))
            # "server full" / "server stopping" pass: worth trying again (a reconnect does), unlike other refusals
            raise (ConnectionLost if error.startswith(RETRY_LATER) else ServerError)(
                f"{self.host}:{self.port} refused us: {error}")
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
                if isinstance(e, ServerError) and FINISHED in str(e):
                    self.finished = True  # the run ended while we were away: nothing lost
                    self.say(f"{self.host}:{self.port} says {FINISHED}")
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

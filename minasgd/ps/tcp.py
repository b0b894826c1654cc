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

All the rules live in `ParameterServer`; this module only moves frames (`minasgd.ps.protocol`)
and turns them into calls. Another transport (MPI: rank 0 the server, ranks 1..N the workers)
would do the same with the same server and `minasgd.ps.worker.Worker`.

Safety: the server binds 127.0.0.1 unless told otherwise, and refuses any other address without a
token. With a token, a worker proves it knows it by sending HMAC-SHA256(token, nonce) for a fresh
random nonce from the server; the token itself never crosses the wire. (Nothing is encrypted:
on an untrusted network use an SSH tunnel or a VPN.) Every connection has a timeout, so a
stuck worker is dropped, and any frame the server rejects ends that worker's connection only.
"""

import errno
import hashlib
import hmac
import ipaddress
import os
import socket
import threading
import time

from .protocol import ConnectionClosed, Msg, ProtocolError, Receiver, send_frame, send_json
from .server import Refused


class ServerError(ConnectionError):
    """The server refused us or went away; the message says why, in one line."""


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


def token_hmac(token, nonce):
    return hmac.new(token.encode(), nonce, hashlib.sha256).hexdigest()


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
    def __init__(self, ps, listener, token=None, timeout=120.0):
        """Serve `ps` on `listener`, a listening socket from `listen()`."""
        self.ps, self.token, self.timeout = ps, token, timeout
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
        while not self.closing:
            try:
                sock, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listening socket was closed
            thread = threading.Thread(target=self._serve_connection, args=(sock, peer),
                                      name=f"ps-conn-{peer[0]}:{peer[1]}", daemon=True)
            with self.lock:
                self.connections[sock] = thread
            thread.start()

    def _serve_connection(self, sock, peer):
        """One worker, from HELLO to BYE. Whatever goes wrong ends this connection only."""
        who = f"{peer[0]}:{peer[1]}"
        worker_id, reason = None, "connection closed"
        sock.settimeout(self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rx = Receiver(sock, max_payload=4 * self.ps.num_params)
        try:
            worker_id = self._handshake(sock, rx)
            who = f"worker {worker_id}"
            reason = self._serve_requests(sock, rx, worker_id)
        except (Refused, ProtocolError) as e:
            if isinstance(e, ConnectionClosed):
                reason = "connection closed" if worker_id is None else f"hung up ({e})"
            else:
                reason = f"rejected: {e}"
                self.ps.reject(who, str(e))
                self._refuse(sock, str(e))
        except TimeoutError:
            reason = f"silent for {self.timeout:g} s (timed out)"
        except OSError as e:
            reason = f"connection error ({e.strerror or e})"
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
            send_json(sock, Msg.ERROR, {"error": error})
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(0.1)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def _handshake(self, sock, rx):
        nonce = os.urandom(16)
        send_json(sock, Msg.HELLO, {"server": "minasgd", "model": self.ps.model_name,
                                    "num_params": self.ps.num_params, "nonce": nonce.hex(),
                                    "auth": bool(self.token)})
        frame = rx.recv()
        if frame.type != Msg.HELLO:
            raise ProtocolError(f"expected HELLO, got {frame.type.name}")
        hello = frame.json()
        if self.token:
            proof = hello.get("hmac")
            if not isinstance(proof, str) or not hmac.compare_digest(proof, token_hmac(self.token, nonce)):
                raise Refused("wrong or missing token")
        worker_id = self.ps.join(hello.get("fingerprint"), hello)
        send_json(sock, Msg.WELCOME, self.ps.welcome(worker_id), seq=frame.seq)
        return worker_id

    def _serve_requests(self, sock, rx, worker_id):
        """Answer FETCH, PUSH and STATS until BYE; returns why the worker left."""
        while True:
            frame = rx.recv()
            if frame.type == Msg.FETCH:
                params, version, done = self.ps.fetch_snapshot(worker_id)  # shared, read-only: no copy
                if done:
                    send_json(sock, Msg.BYE, {"reason": "training finished"}, seq=frame.seq)
                    return "training finished"
                send_frame(sock, Msg.PARAMS, params, seq=frame.seq, version=version)
            elif frame.type == Msg.PUSH:
                grad = frame.floats(self.ps.num_params)
                reply = self.ps.push(worker_id, grad, frame.version, batches=frame.count)
                send_json(sock, Msg.ACK, reply, seq=frame.seq, version=reply["version"])
            elif frame.type == Msg.STATS:
                self.ps.report(worker_id, frame.json())
                send_json(sock, Msg.STATS, self.ps.stats(), seq=frame.seq)
            elif frame.type == Msg.BYE:
                return str(frame.json().get("reason", "said bye"))[:200]
            else:
                raise ProtocolError(f"a worker may not send {frame.type.name}")


# ------------------------------------------------------------------ worker side

class TcpClient:
    def __init__(self, address, token=None, timeout=300.0, connect_timeout=10.0):
        self.host, self.port = parse_address(address) if isinstance(address, str) else address
        self.token, self.seq = token, 0
        self.sock = self._connect(timeout, connect_timeout)
        self.rx = Receiver(self.sock)
        frame = self.rx.recv()
        if frame.type != Msg.HELLO:
            raise ServerError(f"{self.host}:{self.port} did not greet us with HELLO (got {frame.type.name})")
        self.server_hello = frame.json()
        self.num_params = int(self.server_hello.get("num_params", 0))
        self.rx.resize(4 * self.num_params)

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

    def hello(self, fingerprint, info=None):
        """Introduce ourselves (and prove the token); returns the server's WELCOME config."""
        body = {"fingerprint": fingerprint, **(info or {})}
        if self.server_hello.get("auth"):
            if not self.token:
                raise ServerError(f"{self.host}:{self.port} needs a token: pass --token")
            body["hmac"] = token_hmac(self.token, bytes.fromhex(self.server_hello["nonce"]))
        return self._request(Msg.HELLO, body).json()

    def fetch_into(self, out):
        """Receive the current parameters straight into `out` (float32, contiguous); returns the
        server version, or None when training is over."""
        frame = self._request(Msg.FETCH, into=memoryview(out).cast("B"))
        if frame.type == Msg.BYE:
            return None
        frame.floats(out.size)  # checks the size: anything else did not land in `out`
        return frame.version

    def push(self, grad, base_version, batches=1):
        """Send a gradient sum computed from `base_version`; returns the server's {"version", "lr", "done"}."""
        return self._request(Msg.PUSH, grad, version=base_version, count=batches).json()

    def stats(self, numbers=None):
        """Tell the server our numbers (loss, images/s...); returns the server's statistics."""
        return self._request(Msg.STATS, numbers or {}).json()

    def close(self, reason="bye"):
        try:
            self.seq += 1
            send_json(self.sock, Msg.BYE, {"reason": reason}, seq=self.seq)
        except OSError:
            pass
        self.sock.close()

    def _request(self, msg, payload=b"", version=0, count=0, into=None):
        self.seq += 1
        try:
            if isinstance(payload, dict):
                send_json(self.sock, msg, payload, seq=self.seq, version=version)
            else:
                send_frame(self.sock, msg, payload, seq=self.seq, version=version, count=count)
            frame = self.rx.recv(into)
        except ConnectionClosed:
            raise ServerError(f"{self.host}:{self.port} closed the connection") from None
        except (ConnectionResetError, BrokenPipeError):
            raise ServerError(f"{self.host}:{self.port} reset the connection") from None
        except TimeoutError:
            raise ServerError(f"{self.host}:{self.port} did not answer {msg.name} in time") from None
        if frame.type == Msg.ERROR:
            raise ServerError(f"the server refused {msg.name}: {frame.json().get('error', '?')}")
        if frame.seq != self.seq:
            raise ProtocolError(f"reply to message {frame.seq}, expected {self.seq}")
        return frame

"""The TCP server's door: accepting connections and every handshake, in one selector loop.

`Acceptor` is the half of `minasgd.ps.tcp.TcpServer` that runs in the accept thread. A connection
is not a worker until its HELLO proved the token: until then it is a `Handshake` in the selector
loop (no thread, no parameter-sized buffer), at most `max_handshakes` of them, the oldest dropped
when a new one arrives, each with `handshake_timeout` seconds IN TOTAL; a HELLO that has arrived is
read before new connections are accepted, so a flood of connections that never finish cannot keep
out a worker. When accept() fails (too many open files) the loop drops the oldest handshake, backs
off and goes on. A connection past its handshake gets a thread: `_start_thread` calls the server's
`_serve_connection`. TcpServer's __init__ sets up the state used here (sockets, selector, limits).
"""

import errno
import json
import os
import selectors
import socket
import threading
import time

from .protocol import (HEADER, MAGIC, MAX_JSON, PROTOCOL, REFUSED, SERVER_FULL, SERVER_FULL_TEXT, Frame, Msg,
                       ProtocolError, Refused, clip, error_body)
from .session import same_digest, server_proof, token_hmac

ACCEPT_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)  # accept() failures that pass


class Handshake:
    """A connection still in its handshake (the accept thread's alone): who it is, the nonce the
    server's HELLO sent it, the bytes of its own HELLO so far, and when its time is up."""

    __slots__ = ("sock", "who", "nonce", "data", "deadline")

    def __init__(self, sock, who, nonce, deadline):
        self.sock, self.who, self.nonce, self.deadline = sock, who, nonce, deadline
        self.data = bytearray()


class Acceptor:
    """The accept loop and the handshakes (a base class of `TcpServer`, which supplies the state
    and `_serve_connection`)."""

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

"""The TCP transport's worker side: the client a worker talks to the parameter server through.

    client = TcpClient("127.0.0.1:5555", token=None)     # connects, reads the server's HELLO
    config = client.hello(model.fingerprint(), {"name": "host:pid"})   # -> WELCOME, or ServerError
    version = client.fetch_into(params)                  # None once training is over
    reply = client.push(grad_sum, version, batches=4)    # {"version", "lr", "done"}
    client.close("finished")

What the messages mean is `minasgd.ps.session.Client`; this module moves its frames over a socket,
checks what the server's HELLO says, and, given `reconnect` seconds, reconnects with backoff when
the server goes away (a restarted `minasgd serve --resume`). A refusal is judged by its code
(`protocol.read_error`): "server full" and "server stopping" are worth coming back after, and a
server that says the run is finished ends the worker cleanly. Nothing here imports the server.
"""

import os
import socket
import sys
import time

from .protocol import FINISHED, ConnectionClosed, Msg, Receiver, clip, send_frame, send_json
from .session import Client, ConnectionLost, ServerError, refusal

MAX_PARAMS = 2**31  # the most parameters a worker believes a server's HELLO about


def parse_address(text, default_host="127.0.0.1"):
    """"HOST:PORT" (or ":PORT", or "[::1]:PORT") -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or default_host, int(port)


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

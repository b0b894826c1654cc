"""The protocol's meaning, once for every transport: what a request asks and what its reply says.

`minasgd.ps.protocol` fixes the frames (header, payload, bounds). This module is the conversation
built from them, with no socket and no MPI in it:

    serve_requests(ps, link, worker_id)   the server's side after the handshake: FETCH -> PARAMS
                                          (or BYE once training is over), PUSH -> ACK, STATS -> STATS,
                                          until the worker's BYE; anything else is a ProtocolError
    Client                                a worker's side: hello, fetch_into, push, stats, close

A transport (`minasgd.ps.tcp`: sockets, `minasgd.ps.mpi`: MPI ranks) is a byte mover under them.
For the server it hands `serve_requests` a *link* to one worker:

    link.recv()                                     -> the next Frame (the transport's timeout applies)
    link.send(msg, floats, seq, version)            a float32 payload, sent from its own memory
    link.send_json(msg, body, seq, version)         a JSON body
    link.finished(reason)                           -> reason; called once the server said BYE (MPI
                                                    reads the worker's own BYE here, TCP just returns)

For the worker it subclasses `Client` and supplies `_exchange` (send one request, receive its
reply) and a few hooks (`_say_bye`, `_hang_up`, `_skip`, `_reconnect`). The token proofs both
sides compute are here too; `ServerError` and `ConnectionLost` are what a `Client` raises.
"""

import hashlib
import hmac
import math
import os

from .protocol import (REFUSED, RETRY_LATER, STATS_FIELDS, STOPPING_TEXT, FrameTooLarge, Msg, ProtocolError,
                       Stopping, clip, read_error)


class ServerError(ConnectionError):
    """The server refused us or went away; the message says why, in one line, and `code` (one of
    `protocol.CODES`, or None when no ERROR frame was involved) what kind of refusal it was."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class ConnectionLost(ServerError):
    """The server went away (hung up, reset, silent): worth reconnecting to."""


# ------------------------------------------------------------------ the token proofs (both directions)

def token_hmac(token, nonce):
    return hmac.new(token.encode(), nonce, hashlib.sha256).hexdigest()


def server_proof(token, server_nonce, client_nonce):
    """The server's answer to a worker's nonce (a different message than the worker's proof)."""
    return token_hmac(token, b"minasgd-server:" + server_nonce + client_nonce)


def same_digest(proof, expected):
    """compare_digest for a peer-supplied value of any type (a non-ASCII str would raise TypeError)."""
    return isinstance(proof, str) and hmac.compare_digest(proof.encode("utf-8", "replace"), expected.encode())


# ------------------------------------------------------------------ server side

def serve_requests(ps, link, worker_id):
    """Answer FETCH, PUSH and STATS until BYE; returns why the worker left. Errors propagate: the
    transport turns them into an ERROR frame and ends this worker only. A server stopping before
    training is over raises `Stopping` (the transport answers ERROR "server stopping...", not BYE
    "training finished"), which a worker takes as a reason to reconnect."""
    while True:
        frame = link.recv()
        if frame.type == Msg.FETCH:
            with ps.fetch_snapshot(worker_id) as (params, version, done):  # shared, read-only: no copy
                if not done:
                    link.send(Msg.PARAMS, params, seq=frame.seq, version=version)
            if done and ps.interrupted:
                raise Stopping(f"{STOPPING_TEXT}: training is not over; reconnect to the resumed server")
            if done:
                link.send_json(Msg.BYE, {"reason": "training finished"}, seq=frame.seq)
                return link.finished("training finished")
        elif frame.type == Msg.PUSH:
            grad = frame.floats(ps.num_params)
            reply = ps.push(worker_id, grad, frame.version, batches=frame.count)
            link.send_json(Msg.ACK, reply, seq=frame.seq, version=reply["version"])
        elif frame.type == Msg.STATS:
            ps.report(worker_id, frame.json())
            link.send_json(Msg.STATS, ps.stats_reply(), seq=frame.seq)
        elif frame.type == Msg.BYE:
            return clip(frame.json().get("reason", "said bye"))
        else:
            raise ProtocolError(f"a worker may not send {frame.type.name}")


# ------------------------------------------------------------------ worker side

class Client:
    """A worker's requests and the checks on their replies; a transport subclass moves the bytes.

    The subclass sets `where` (how messages name the server), `num_params` and `server_hello`
    (from the server's HELLO), and implements `_exchange`, `_say_bye`, `_hang_up` and `_skip`.
    `_reconnect(error)` re-raises here; TcpClient overrides it to reconnect with backoff.
    """

    where = "the server"

    def __init__(self, token=None, say=None):
        self.token, self.seq, self.say = token, 0, say
        self.reconnects = 0
        self.introduction = None  # (fingerprint, info, num_params) from hello(), replayed on reconnect
        self.need_fetch = False  # after a reconnect: no push until fresh parameters were fetched
        self.finished = False  # a reconnect found the run over
        self.last_reply = {"version": 0, "steps": 0, "lr": 0.0, "done": False}

    def hello(self, fingerprint, info=None, num_params=None):
        """Introduce ourselves (and prove the token); returns the server's WELCOME config.

        `num_params`: our model's size; a server announcing another is refused before anything
        is allocated. With a token the server must prove it too (WELCOME's "proof").
        """
        if num_params is not None and num_params != self.num_params:
            raise ServerError(f"{self.where} serves {self.num_params:,} parameters, our model has {num_params:,}")
        self.introduction = (fingerprint, dict(info or {}), num_params)
        body = {"fingerprint": fingerprint, **(info or {})}
        my_nonce = os.urandom(16)
        if self.token:
            if not self.server_hello.get("auth"):
                raise ServerError(f"{self.where} does not ask for the token: not trusting it")
            body["hmac"] = token_hmac(self.token, bytes.fromhex(self.server_hello["nonce"]))
            body["nonce"] = my_nonce.hex()
        elif self.server_hello.get("auth"):
            raise ServerError(f"{self.where} needs a token: pass --token")
        config = self._json(self._request(Msg.HELLO, body))
        if self.token and not same_digest(config.get("proof"), server_proof(
                self.token, bytes.fromhex(self.server_hello["nonce"]), my_nonce)):
            self._hang_up()
            raise ServerError(f"{self.where} could not prove it knows the token: not trusting it")
        for key in ("lr", "steps"):
            if isinstance(config.get(key), (int, float)):
                self.last_reply[key] = config[key]
        return config

    def fetch_into(self, out):
        """Receive the current parameters straight into `out` (float32, contiguous); returns the
        server version, or None when training is over."""
        while True:
            if self.finished:
                return None
            try:
                frame = self._request(Msg.FETCH, into=out)
                break
            except ConnectionLost as e:
                self._reconnect(e)
        if frame.type == Msg.BYE:
            return None
        if frame.type != Msg.PARAMS or len(frame.payload) != out.nbytes:  # else it did not land in `out`
            raise ServerError(f"{self.where} answered FETCH with {frame.type.name} of "
                              f"{len(frame.payload)} bytes, not {out.nbytes}")
        self.need_fetch = False
        return frame.version

    def push(self, grad, base_version, batches=1):
        """Send a step sum computed from `base_version`; returns the server's {"version", "steps", "lr", "done"}.

        After a reconnect, until the next fetch: not sent (it was computed from the old server's
        parameters); the reply is the last one seen, with "dropped": True.
        """
        if not self.need_fetch and not self.finished:
            try:
                reply = self._json(self._request(Msg.PUSH, grad, version=base_version, count=batches))
                lr, version, steps = reply.get("lr"), reply.get("version"), reply.get("steps")
                if (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr)
                        or not isinstance(version, int) or not isinstance(reply.get("done"), bool)
                        or isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
                    raise ServerError(f"{self.where} sent a bad ACK (version, steps, lr, done): {clip(reply, 120)}")
                self.last_reply = reply
                return reply
            except ConnectionLost as e:
                self._reconnect(e)
        return {**self.last_reply, "done": self.finished, "dropped": True}

    def stats(self, numbers=None):
        """Tell the server our numbers (loss, images/s...); returns the server's statistics.

        A reply we cannot read (too big, not JSON) is skipped with a one-line notice: it is
        only information, and the connection stays usable."""
        if self.finished:
            return {}
        try:
            # Only the fields the server accepts (it refuses the whole message for one unknown).
            body = {k: v for k, v in {**(numbers or {}), "reconnects": self.reconnects}.items() if k in STATS_FIELDS}
            frame = self._request(Msg.STATS, body if numbers is not None else {})
            return frame.json()
        except ConnectionLost as e:
            self._reconnect(e)
        except FrameTooLarge as e:
            if e.length > 16 * 2**20:
                raise ServerError(f"{self.where} sent a {e.length:,}-byte STATS reply") from None
            self._skip(e.length)
            self.say(f"ignored the server's STATS reply ({e})")
        except ProtocolError as e:
            self.say(f"ignored the server's STATS reply ({e})")
        return {}

    def close(self, reason="bye"):
        """Say BYE (whatever happens to it) and let go of the server."""
        self.seq += 1
        self._say_bye(reason)

    def _request(self, msg, payload=b"", version=0, count=0, into=None):
        """Send one request and return its checked reply. `payload`: a dict (JSON) or a float32
        vector; `into`: a float32 vector the reply's parameters may land in. A reply that is not a
        valid frame is a ServerError, except for STATS (stats() skips what it can)."""
        self.seq += 1
        try:
            frame = self._exchange(msg, payload, version, count, into)
        except ProtocolError as e:
            if msg == Msg.STATS:
                raise
            raise ServerError(f"{self.where} sent a bad reply to {msg.name}: {e}") from None
        if frame.type == Msg.ERROR:
            raise refusal(frame, f"the server refused {msg.name}")
        if frame.seq != self.seq:
            raise ServerError(f"{self.where} answered message {frame.seq}, expected {self.seq}")
        return frame

    def _json(self, frame):
        """A reply's JSON body; ServerError (one line) if it is not a JSON object."""
        try:
            return frame.json()
        except ProtocolError as e:
            raise ServerError(f"{self.where} sent a bad {frame.type.name}: {e}") from None

    # --- what a transport supplies
    def _exchange(self, msg, payload, version, count, into):
        """Send request `msg` (seq `self.seq`) and return the reply frame; ConnectionLost when the
        server went away, ProtocolError when the reply is not a valid frame."""
        raise NotImplementedError

    def _say_bye(self, reason):
        """Send BYE {"reason"} with seq `self.seq`, ignoring a server already gone; then let go."""
        raise NotImplementedError

    def _hang_up(self):
        """Drop the connection now (a server that failed the token proof)."""

    def _skip(self, length):
        """Read and drop a too-large reply's `length` payload bytes, so the stream stays in step."""
        raise NotImplementedError

    def _reconnect(self, error):
        """The server went away (`error`, a ConnectionLost): here, give up."""
        raise error


def refusal(frame, what):
    """The exception a client raises for an ERROR `frame`, its message `what: the reason`, decided
    by the frame's code (`protocol.read_error`), never by its words: ConnectionLost for a code in
    RETRY_LATER ("server stopping", "server full": worth coming back, a reconnect does), else
    ServerError; either way `.code` says which refusal it was."""
    try:
        code, text = read_error(frame.json())
    except ProtocolError as e:
        code, text = REFUSED, f"(unreadable: {e})"
    return (ConnectionLost if code in RETRY_LATER else ServerError)(f"{what}: {text}", code=code)

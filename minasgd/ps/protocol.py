"""The wire format between workers and the parameter server (what each message means: `minasgd.ps.session`).

Every message is one frame: a fixed 32-byte header, then `length` bytes of payload.

    offset  size  field     meaning
         0     4  magic     b"MASG"
         4     1  protocol  PROTOCOL, bumped whenever this format changes
         5     1  type      a `Msg` value
         6     2  count     PUSH: mini-batches summed into the gradient; 0 otherwise
         8     8  length    payload bytes that follow the header
        16     8  seq       the sender's message number; a reply repeats its request's seq
        24     8  version   PARAMS: server version sent; PUSH: version the gradient was computed
                            from; ACK: server version after the push; 0 otherwise

All integers are little-endian. A payload is either raw little-endian float32 (PARAMS, PUSH:
the whole flat vector, sent straight from the NumPy buffer and received straight into one) or
a small UTF-8 JSON object (everything else). Nothing received is ever unpickled or evaluated.

A conversation (worker on the left):

    <- HELLO   {"model", "num_params", "nonce", "auth"}          server speaks first
    -> HELLO   {"fingerprint", "name", "npush", "hmac", "nonce"} hmac of the server's nonce with the
                                                                  token, and our own nonce
    <- WELCOME {"worker_id", "version", "proof", config...}      proof: the server's hmac of both
               or ERROR {"error", "code"}, then it hangs up      nonces (with a token)
    -> FETCH                          <- PARAMS  float32[num_params], version
    -> PUSH    float32[num_params]    <- ACK     {"steps", "lr", "done"}, version
    -> STATS   {"loss", ...}          <- STATS   the server's statistics
    -> BYE     {"reason"}                                         either side, then it hangs up

Once training is over the server answers FETCH with BYE. Any request the server rejects
(bad header, wrong payload size, non-finite gradient...) gets ERROR and the connection closes.
An ERROR's "error" is one line for people; its "code" (REFUSED, FINISHED, STOPPING, SERVER_FULL)
is what a client acts on: it never reads meaning into the words, which may quote a peer's strings.

Bounds: only PARAMS and PUSH may carry more than MAX_JSON (64 KiB); a control frame announcing
more is refused from its header alone. A JSON body nested too deeply is refused like any other
bad body. With a token both sides prove it (`minasgd.ps.session`): the worker's HELLO carries
its own nonce and the server's WELCOME answers it.
"""

import enum
import json
import struct
import time

import numpy as np

MAGIC = b"MASG"
PROTOCOL = 3  # 3: an ERROR body carries a "code" that clients act on (was: its words were matched)
#              2: a PUSH carries the displacement the worker moved (was: velocities to scale by the lr)
HEADER = struct.Struct("<4sBBHQQQ")  # magic, protocol, type, count, length, seq, version: 32 bytes
MAX_JSON = 64 * 1024  # a control body is never bigger than this


class Msg(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    ERROR = 3
    FETCH = 4
    PARAMS = 5
    PUSH = 6
    ACK = 7
    STATS = 8
    BYE = 9


# ------------------------------------------------------------------ the vocabulary both sides share

# The numbers a worker may report in STATS (the server refuses anything else), and their types.
STATS_FIELDS = {"loss": float, "steps": int, "images": int, "pushes": int, "fetches": int,
                "images_per_second": float, "lr": float, "seconds": float, "reconnects": int}
MAX_NPUSH = 1024  # the most mini-batches one push may sum (the frame's count field allows 65535)

# An ERROR frame's body is {"error": one line for people, "code": one of these for programs}.
# A client decides what to do from the code, never from the words (which quote peer strings).
REFUSED = "refused"  # the request is wrong; the text says why. Do not insist.
FINISHED = "finished"  # training is over: a (re)joining worker has nothing left to do
STOPPING = "stopping"  # the server stops before training is over: reconnect to the resumed one
SERVER_FULL = "server_full"  # max_connections reached: try again later
RETRY_LATER = frozenset({STOPPING, SERVER_FULL})  # the codes a reconnecting worker comes back after
CODES = frozenset({REFUSED, FINISHED, STOPPING, SERVER_FULL})
# The start of each code's text (what people read in logs and on the dashboard).
FINISHED_TEXT = "training is already finished"
STOPPING_TEXT = "server stopping"
SERVER_FULL_TEXT = "server full"


class Refused(Exception):
    """A request the server will not serve; the one-line message goes back to the worker in an
    ERROR frame with this refusal's `code` (REFUSED unless a subclass says otherwise)."""

    code = REFUSED


class Finished(Refused):
    """Training is over: a worker (re)joining now is told so, and is done."""

    code = FINISHED


class Stopping(Refused):
    """The server is stopping before training is over (a signal, an error): the worker should
    reconnect to the server that resumes the run, not believe training is done."""

    code = STOPPING


class ServerFull(Refused):
    """max_connections workers are connected already: come back later."""

    code = SERVER_FULL


def error_body(error, code=REFUSED):
    """An ERROR frame's body: the reason made safe (`clip`) and its code."""
    return {"error": clip(error), "code": code if code in CODES else REFUSED}


def read_error(body):
    """(code, text) of an ERROR frame's JSON body, whatever a peer put in it: a code that is not
    one of CODES (or none, or not a string) reads as REFUSED."""
    if not isinstance(body, dict):
        return REFUSED, clip(body)
    code = body.get("code")
    return (code if isinstance(code, str) and code in CODES else REFUSED), clip(body.get("error", "?"))


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame here; the message says what."""


class ConnectionClosed(ProtocolError):
    """The peer hung up (cleanly, between frames, or in the middle of one)."""


class FrameTooLarge(ProtocolError):
    """A header announced more bytes than allowed; its payload is still unread (`length` bytes)."""

    def __init__(self, message, length):
        super().__init__(message)
        self.length = length


DATA_MESSAGES = frozenset({Msg.PARAMS, Msg.PUSH})  # the only frames bigger than MAX_JSON


class Frame:
    """A received frame: the header fields, and `payload`, a memoryview into the receive buffer."""

    __slots__ = ("type", "count", "seq", "version", "payload")

    def __init__(self, type, count, seq, version, payload):
        self.type, self.count, self.seq, self.version, self.payload = type, count, seq, version, payload

    def floats(self, n):
        """The payload as float32[n], without copying; ProtocolError if it has another size."""
        if len(self.payload) != 4 * n:
            raise ProtocolError(f"{self.type.name} carries {len(self.payload)} bytes, expected {4 * n} "
                                f"({n} float32 parameters)")
        return np.frombuffer(self.payload, dtype="<f4")

    def json(self):
        """The payload as a JSON object (a dict); ProtocolError if it is not one."""
        try:
            body = json.loads(bytes(self.payload).decode("utf-8")) if len(self.payload) else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise ProtocolError(f"{self.type.name} body is not valid JSON: {clip(str(e), 120)}") from None
        except RecursionError:
            raise ProtocolError(f"{self.type.name} body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ProtocolError(f"{self.type.name} body must be a JSON object, got {type(body).__name__}")
        return body


# ------------------------------------------------------------------ sending

def send_frame(sock, msg, payload=b"", seq=0, version=0, count=0):
    """Send one frame. `payload`: bytes, or a float32 NumPy vector sent from its own memory (no copy)."""
    if isinstance(payload, np.ndarray):
        if payload.dtype != np.dtype("<f4") or not payload.flags.c_contiguous:
            raise ValueError("send_frame: a vector payload must be contiguous little-endian float32")
        payload = memoryview(payload).cast("B")
    send_parts(sock, [HEADER.pack(MAGIC, PROTOCOL, msg, count, len(payload), seq, version), payload])


def send_parts(sock, parts):
    """Send byte buffers back to back, with no concatenated copy of a multi-megabyte payload.

    One sendmsg puts the header and as much payload as the socket takes in one system call (all
    of a small frame); whatever is left goes out through sendall, whose loop runs in C."""
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    sent = sock.sendmsg(views) if views else 0
    for view in views:
        if sent < len(view):
            sock.sendall(view[sent:])
        sent = max(0, sent - len(view))


def send_json(sock, msg, body, seq=0, version=0):
    send_frame(sock, msg, json.dumps(body).encode("utf-8"), seq=seq, version=version)


def clip(text, limit=200):
    """`text` made safe for a terminal, a log and JSON: printable characters only, at most `limit` of them.

    The one function every peer-supplied string goes through before it is echoed back, logged, put
    in an event, metrics.jsonl, summary.json or the dashboard. Control characters (C0, DEL, C1:
    ESC starts terminal escape sequences such as OSC 52 clipboard writes or CSI 2J), format
    characters (bidirectional overrides), lone surrogates (valid JSON, but no UTF-8 encodes them)
    and line or paragraph separators each become "?"; a longer text is cut and ends in "...".
    """
    text = str(text)
    if len(text) > limit:
        text = text[: max(0, limit - 3)] + "..."
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


# ------------------------------------------------------------------ receiving

def recv_exactly(sock, view, deadline=None):
    """Fill the memoryview `view` from the socket with recv_into; ConnectionClosed on EOF.

    `deadline`: a time.monotonic() by which the whole of `view` must have arrived (TimeoutError
    after it), so a peer dripping one byte at a time cannot hold us longer than that.
    """
    got = 0
    while got < len(view):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("deadline passed")
            sock.settimeout(left)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionClosed("connection closed" + (" in the middle of a frame" if got else ""))
        got += n


class Receiver:
    """Reads frames from one socket into buffers allocated once.

    `max_payload` bounds the length a header may announce, so a garbage length can never make
    us allocate (or wait for) gigabytes: it is the parameter vector's size, or MAX_JSON if larger.
    """

    def __init__(self, sock, max_payload=MAX_JSON):
        self.sock = sock
        self.header = memoryview(bytearray(HEADER.size))
        self.resize(max_payload)

    def resize(self, max_payload):
        self.buffer = memoryview(bytearray(max(max_payload, MAX_JSON)))

    def recv(self, into=None, deadline=None):
        """The next frame; ProtocolError (nothing more can be read) if its header is invalid.

        `into`: a writable byte memoryview; a payload of exactly its size lands there instead of
        in our buffer (a fetch receives straight into the caller's parameter vector, no copy).
        `deadline`: see `recv_exactly` (the handshake's total deadline).
        """
        recv_exactly(self.sock, self.header, deadline)
        magic, protocol, msg, count, length, seq, version = HEADER.unpack(self.header)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r} (not a minasgd peer?)")
        if protocol != PROTOCOL:
            raise ProtocolError(f"protocol version {protocol}, this side speaks version {PROTOCOL}")
        try:
            msg = Msg(msg)
        except ValueError:
            raise ProtocolError(f"unknown message type {msg}") from None
        if msg not in DATA_MESSAGES and length > MAX_JSON:
            raise FrameTooLarge(f"{msg.name} announces {length} bytes, more than the {MAX_JSON} a control "
                                f"frame may carry", length)
        payload = into if into is not None and length == len(into) else None
        if payload is None:
            if length > len(self.buffer):
                raise FrameTooLarge(f"{msg.name} announces {length} bytes, more than the {len(self.buffer)} "
                                    f"allowed", length)
            payload = self.buffer[:length]
        recv_exactly(self.sock, payload, deadline)
        return Frame(msg, count, seq, version, payload)

    def skip(self, length):
        """Read and drop `length` payload bytes (after FrameTooLarge), so the stream stays in step."""
        chunk = self.buffer[: min(len(self.buffer), MAX_JSON)]
        while length > 0:
            n = min(length, len(chunk))
            recv_exactly(self.sock, chunk[:n])
            length -= n

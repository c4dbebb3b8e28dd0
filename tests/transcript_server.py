"""An HTTP server that replays a recorded answer byte for byte, cut where a test says.

The fault upstream (``fault_upstream.py``) renders each API's wire format
itself; this one renders nothing: it sends a transcript (a file under
``tests/data``) exactly as stored, so a worker meets the API's bytes as the
API's documentation shows them. A stream goes out as the API sends it, one
HTTP chunk per SSE event; a JSON reply with a ``content-length``.

What a test chooses is where the bytes are cut (``split``): the whole answer
in one write, one write per HTTP chunk, one per byte, or cuts at seeded
random places. Writes alone do not make reads: the kernel would join
back-to-back writes and the client would see one read. So between writes the
server waits until the client has taken the bytes out of its socket (its own
send queue acknowledged, then the client's receive queue empty: ``SIOCOUTQ``
and ``FIONREAD``, the client being a socket of this same process), and each
write reaches the client as a read of its own. That is polling a condition,
not sleeping a guessed time; a client that stops reading ends the pacing
after ``PACE_TIMEOUT_S``, and the rest goes out unpaced.

Usage::

    with TranscriptServer() as server:
        server.script(Replay(Path("text_stream.sse").read_bytes(), split="bytes"))
        ...  # point a worker at server.url
        assert server.calls[0].path == "/v1/messages"
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import random
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import msgspec
import psutil

__all__ = ["Call", "Replay", "Split", "TranscriptServer", "wire_pieces"]

# Linux's ioctl for the bytes a socket has sent but not had acknowledged.
SIOCOUTQ = 0x5411
PACE_TIMEOUT_S = 10.0
_POLL_S = 0.00005

Split = Literal["whole", "events", "bytes"] | int


@dataclass(frozen=True)
class Replay:
    """One answer: ``body`` as stored, sent with ``status`` and ``content_type``.

    ``split``: ``"whole"`` (one write), ``"events"`` (the head, then one write
    per HTTP chunk), ``"bytes"`` (every byte a write of its own, framing
    included), or an int: the seed of random cuts, 1 to 24 bytes apart.
    """

    body: bytes
    status: int = 200
    content_type: str = "text/event-stream"
    split: Split = "whole"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Call:
    """One request as it arrived."""

    at: float
    path: str
    headers: dict[str, str]
    body: Any


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 429: "Too Many Requests"}


def wire_pieces(replay: Replay) -> list[bytes]:
    """The bytes of the whole HTTP answer, cut as ``replay.split`` says."""
    status = f"HTTP/1.1 {replay.status} {_REASONS.get(replay.status, 'Status')}\r\n"
    head = [status, f"content-type: {replay.content_type}\r\n"]
    head += [f"{name}: {value}\r\n" for name, value in replay.headers]
    if replay.content_type.startswith("text/event-stream"):
        # As the API sends a stream: chunked, one chunk per event (blank line included).
        events = replay.body.split(b"\n\n")
        parts = [e + b"\n\n" for e in events[:-1]] + ([events[-1]] if events[-1] else [])
        body = [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]
        head.append("transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n")
    else:
        body = [replay.body]
        head.append(f"content-length: {len(replay.body)}\r\n\r\n")
    writes = ["".join(head).encode(), *body]
    wire = b"".join(writes)
    if replay.split == "whole":
        return [wire]
    if replay.split == "events":
        return writes
    if replay.split == "bytes":
        return [wire[i : i + 1] for i in range(len(wire))]
    rng = random.Random(replay.split)
    pieces: list[bytes] = []
    at = 0
    while at < len(wire):
        step = rng.randint(1, 24)
        pieces.append(wire[at : at + step])
        at += step
    return pieces


def _queued(fd: int, request: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0])


class TranscriptServer:
    """The server; a context manager that starts and stops it. Each request takes
    the next scripted ``Replay``; one that finds the script empty gets a 500."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._script: collections.deque[Replay] = collections.deque()
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        """The root: an Anthropic ``base_url``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def script(self, *replays: Replay) -> None:
        with self._lock:
            self._script.extend(replays)

    def __enter__(self) -> TranscriptServer:
        self._spawn(self._accept)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="transcripts")
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            client_fd = _client_fd(conn.getpeername())
            while (call := _read_request(reader)) is not None:
                with self._lock:
                    self._calls.append(call)
                    replay = self._script.popleft() if self._script else None
                if replay is None:
                    replay = Replay(b"{}", status=500, content_type="application/json")
                self._send(conn, client_fd, wire_pieces(replay))
        except OSError:
            pass  # the client hung up (after an error event, say) or the server stopped
        finally:
            with self._lock:
                self._conns.discard(conn)
            reader.close()
            conn.close()

    def _send(self, conn: socket.socket, client_fd: int | None, pieces: list[bytes]) -> None:
        pace = True
        for i, piece in enumerate(pieces):
            conn.sendall(piece)
            if pace and i < len(pieces) - 1:
                pace = self._wait_taken(conn.fileno(), client_fd)

    def _wait_taken(self, server_fd: int, client_fd: int | None) -> bool:
        """Wait until the client has read everything sent; False if it does not in
        time, has closed its end (after an error event, say), or the server stops."""
        deadline = time.monotonic() + PACE_TIMEOUT_S
        while time.monotonic() < deadline and not self._closed.is_set():
            try:
                # The client's side first: once it has closed, its descriptor is gone
                # (EBADF), while our unacknowledged bytes would wait forever.
                unread = 0 if client_fd is None else _queued(client_fd, termios.FIONREAD)
                if unread == 0 and _queued(server_fd, SIOCOUTQ) == 0:
                    return True
            except OSError:
                return False
            time.sleep(_POLL_S)
        return False


def _client_fd(peer: tuple[str, int]) -> int | None:
    """The descriptor of the client's end of this connection, when the client is
    this process (the worker under test is); None otherwise."""
    for conn in psutil.Process().net_connections(kind="tcp4"):
        if conn.laddr and (conn.laddr.ip, conn.laddr.port) == peer[:2] and conn.fd >= 0:
            return int(conn.fd)
    return None


def _read_request(reader: Any) -> Call | None:
    """The next request on the connection (None when the client closed it)."""
    line = reader.readline()
    if not line:
        return None
    _method, path, _version = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raw = reader.read(int(headers.get("content-length", "0")))
    try:
        body = msgspec.json.decode(raw) if raw else None
    except msgspec.DecodeError:
        body = None
    return Call(time.monotonic(), path, headers, body)

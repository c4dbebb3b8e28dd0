"""The WebSocket session over the real HTTP layer and loopback sockets, frame by frame.

The client is hand-made (raw socket, frames built and parsed with the
``websockets`` sans-I/O classes) so a test can send what no polite client
would: oversized and fragmented messages, invalid UTF-8, binary frames. The
pipeline is a fake whose streams say when they were closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.protocol import OPEN, Protocol, Side
from websockets.utils import accept_key

from mpipeline.config import Catalog, InferenceConfig, ModelConfig
from mpipeline.errors import ErrorCode, RequestFailed
from mpipeline.gateway import websocket
from mpipeline.gateway.admission import Admission
from mpipeline.gateway.exchange import Reply, Request, Response, Switch
from mpipeline.gateway.models import Models
from mpipeline.gateway.server import HttpServer, bind
from mpipeline.messages import Completed, Failed, Priority, TokenChunk, Turn, Usage
from mpipeline.pipeline import RequestOptions

LIMIT = 1000
POLL_S = 0.02
# Polls in a row without change before a count is taken as settled (0.2 s).
QUIET_POLLS = 10
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
HANDSHAKE = {
    "host": "test",
    "upgrade": "websocket",
    "connection": "Upgrade",
    "sec-websocket-key": KEY,
    "sec-websocket-version": "13",
}


class FakeStreams:
    """Streams the input's words as chunks; a ``hold`` word waits for ``release``,
    ``fail`` fails."""

    def __init__(self) -> None:
        self.ids = itertools.count()
        self.started: list[str] = []
        self.closed: list[str] = []
        self.step = 0.0
        self.release = asyncio.Event()
        self.yielded = 0
        self.options: list[RequestOptions | None] = []
        # Requests cut by the session (a reader that stalled), with the code given.
        self.cancelled: list[tuple[str, ErrorCode]] = []

    def cancel(self, request_id: str, reason: str, code: ErrorCode) -> bool:
        self.cancelled.append((request_id, code))
        return True

    async def stream_events(
        self, text: str, options: RequestOptions | None = None, /
    ) -> AsyncIterator[TokenChunk | Completed]:
        self.options.append(options)
        session_id = options.session_id if options is not None else None
        rid = f"r{next(self.ids)}"
        self.started.append(rid)
        try:
            words = text.split()
            if words == ["flood"]:  # 64 KiB chunks for as long as they are taken
                for i in range(100_000):
                    self.yielded += 1
                    yield TokenChunk(
                        request_id=rid, session_id=None, reply_to=0, index=i, text="x" * 65536
                    )
            for i, word in enumerate(words):
                if word == "fail":
                    failed = Failed(
                        request_id=rid,
                        session_id=session_id,
                        reply_to=0,
                        code=ErrorCode.DEADLINE_EXCEEDED,
                        reason="too slow",
                        stage="post",
                    )
                    raise RequestFailed(failed)
                if word == "hold":
                    await self.release.wait()
                await asyncio.sleep(self.step)
                yield TokenChunk(
                    request_id=rid, session_id=session_id, reply_to=0, index=i, text=word
                )
            usage = Usage(prompt_tokens=len(words), completion_tokens=len(words))
            yield Completed(
                request_id=rid,
                session_id=session_id,
                reply_to=0,
                text="".join(words),
                usage=usage,
            )
        finally:
            self.closed.append(rid)


class StreamApp:
    """Only ``/v1/stream`` (and ``/deny``, refused by precheck)."""

    def __init__(self, streams: FakeStreams) -> None:
        self.streams = streams

    def precheck(self, request: Request) -> Reply | None:
        if request.path == "/deny":
            return Reply(401, b'{"denied":true}')
        return None

    async def handle(self, request: Request, response: Response) -> None:
        response.send(426, b'{"plain":true}')

    def error_reply(
        self, path: str, status: int, message: str, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> Reply:
        return Reply(status, json.dumps({"message": message}).encode(), headers)

    def admit(self, session: str | None) -> Reply | None:
        if session != "throttled":
            return None
        body = {"error": {"type": "rate_limited", "message": "slow down"}}
        return Reply(429, json.dumps(body).encode(), (("retry-after", "1"),))

    def upgrade(self, request: Request) -> Reply | Switch | None:
        opened = websocket.accept(request, self.streams, max_message=LIMIT, admit=self.admit)
        if isinstance(opened, websocket.Refusal):
            return self.error_reply(
                request.path, opened.status, opened.message, headers=opened.headers
            )
        return opened


class Client:
    """A raw WebSocket client: frames out exactly as told, frames in as parsed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.proto = Protocol(Side.CLIENT, state=OPEN, max_size=None)
        self.frames: list[Frame] = []

    def send(self, opcode: Opcode, data: bytes, fin: bool = True) -> None:
        self.writer.write(Frame(opcode, data, fin).serialize(mask=True))

    def send_json(self, obj: object) -> None:
        self.send(Opcode.TEXT, json.dumps(obj).encode())

    async def frame(self) -> Frame:
        while not self.frames:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                raise EOFError("the server closed the connection")
            self.proto.receive_data(data)
            self.frames += [e for e in self.proto.events_received() if isinstance(e, Frame)]
            for out in self.proto.data_to_send():  # our pongs and close echo
                if out:
                    self.writer.write(out)
        return self.frames.pop(0)

    async def message(self) -> dict[str, Any]:
        frame = await self.frame()
        assert frame.opcode is Opcode.TEXT, frame
        out: dict[str, Any] = json.loads(bytes(frame.data))
        return out

    async def until_done(self) -> list[dict[str, Any]]:
        """Messages up to and including the next ``done`` or ``error``."""
        out = [await self.message()]
        while out[-1]["type"] not in ("done", "error"):
            out.append(await self.message())
        return out

    async def close_code(self) -> int:
        frame = await self.frame()
        assert frame.opcode is Opcode.CLOSE, frame
        return Close.parse(frame.data).code

    async def eof(self) -> bool:
        with contextlib.suppress(ConnectionError):
            return await asyncio.wait_for(self.reader.read(), 5) == b""
        return True


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``server``, closed when the test's ``serving`` block ends."""
    host, port = server.address
    reader, writer = await asyncio.open_connection(host, port)
    _writers.append(writer)
    return reader, writer


_writers: list[asyncio.StreamWriter] = []


async def handshake(
    server: HttpServer, headers: dict[str, str] | None = None, path: str = "/v1/stream"
) -> tuple[int, dict[str, str], bytes, Client]:
    reader, writer = await connect(server)
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in (headers or HANDSHAKE).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *rest = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in rest:
        if line:
            k, _, v = line.partition(":")
            fields[k.strip().lower()] = v.strip()
    body = await reader.readexactly(int(fields.get("content-length", "0")))
    return int(status_line.split()[1]), fields, body, Client(reader, writer)


@contextlib.asynccontextmanager
async def serving(streams: FakeStreams | None = None) -> AsyncIterator[HttpServer]:
    server = HttpServer(StreamApp(streams or FakeStreams()), max_body=LIMIT)
    await server.start(bind("127.0.0.1", 0))
    try:
        yield server
    finally:
        for writer in _writers:
            writer.close()
        _writers.clear()
        await server.stop(1.0)


@contextlib.asynccontextmanager
async def session(streams: FakeStreams | None = None) -> AsyncIterator[tuple[HttpServer, Client]]:
    async with serving(streams) as server:
        status, _, _, client = await handshake(server)
        assert status == 101
        yield server, client


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 20))


async def until(predicate: Callable[[], object], what: str, within_s: float) -> None:
    """Poll ``predicate`` against a deadline; fail naming ``what``."""
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {within_s:.0f}s waiting for {what}"
        await asyncio.sleep(POLL_S)


async def settled(read: Callable[[], int], within_s: float = 10.0) -> int:
    """``read()`` once it has stopped changing: the same over ``QUIET_POLLS`` polls
    in a row (each lets the event loop run everything that is ready)."""
    deadline = time.monotonic() + within_s
    last, same = read(), 0
    while same < QUIET_POLLS:
        assert time.monotonic() < deadline, f"still changing after {within_s:.0f}s: {last}"
        await asyncio.sleep(POLL_S)
        now = read()
        same = same + 1 if now == last else 0
        last = now
    return last


def test_handshake_then_a_streamed_request() -> None:
    async def main() -> None:
        async with serving() as server:
            status, headers, _, client = await handshake(server)
            assert status == 101
            assert headers["upgrade"] == "websocket"
            assert headers["sec-websocket-accept"] == accept_key(KEY)
            assert "sec-websocket-extensions" not in headers  # no permessage-deflate
            client.send_json({"input": "a b c", "ref": "mine"})
            messages = await client.until_done()
            assert [m["type"] for m in messages] == ["accepted", "chunk", "chunk", "chunk", "done"]
            assert {m["ref"] for m in messages} == {"mine"}
            assert {m["request_id"] for m in messages} == {"r0"}
            chunks = [m for m in messages if m["type"] == "chunk"]
            assert [c["index"] for c in chunks] == [0, 1, 2]
            assert "".join(c["text"] for c in chunks) == messages[-1]["text"] == "abc"
            assert messages[-1]["usage"]["total_tokens"] == 6
            assert messages[-1]["finish_reason"] == "stop"
            # A request without a ref: ref is null.
            client.send_json({"input": "x"})
            assert {m["ref"] for m in await client.until_done()} == {None}

    run(main)


def test_a_message_carries_every_request_option_history_included() -> None:
    """The WebSocket builds the same RequestOptions as POST /v1/prompt (it had lost
    ``history``)."""
    streams = FakeStreams()

    async def main() -> None:
        async with session(streams) as (_, client):
            client.send_json(
                {
                    "input": "now",
                    "session_id": "s1",
                    "metadata": {"k": "v"},
                    "priority": "high",
                    "deadline_ms": 5000,
                    "max_tokens": 3,
                    "history": [
                        {"role": "user", "content": "before"},
                        {"role": "assistant", "content": "reply"},
                    ],
                }
            )
            await client.until_done()

    run(main)
    want = RequestOptions(
        session_id="s1",
        metadata={"k": "v"},
        priority=Priority.HIGH,
        deadline_ms=5000.0,
        max_tokens=3,
        history=[Turn(role="user", content="before"), Turn(role="assistant", content="reply")],
    )
    assert streams.options == [want]


@pytest.mark.parametrize(
    ("change", "status", "header"),
    [
        ({"sec-websocket-version": "8"}, 426, ("sec-websocket-version", "13")),
        ({"sec-websocket-version": None}, 400, None),
        ({"sec-websocket-key": None}, 400, None),
        ({"sec-websocket-key": "short"}, 400, None),
        ({"upgrade": "h2c"}, 426, ("upgrade", "websocket")),
    ],
)
def test_bad_handshakes_are_refused_with_an_http_status(
    change: dict[str, str | None], status: int, header: tuple[str, str] | None
) -> None:
    async def main() -> None:
        headers = {k: v for k, v in (HANDSHAKE | change).items() if v is not None}
        async with serving() as server:
            got, fields, body, client = await handshake(server, headers)
            assert got == status, body
            assert json.loads(body)["message"]
            if header is not None:
                assert fields[header[0]] == header[1]
            assert fields["connection"] == "close"
            assert await client.eof()

    run(main)


def test_precheck_refuses_before_the_switch() -> None:
    async def main() -> None:
        async with serving() as server:
            status, _, body, client = await handshake(server, path="/deny")
            assert (status, body) == (401, b'{"denied":true}')
            assert await client.eof()

    run(main)


def test_bytes_sent_with_the_head_reach_the_session() -> None:
    async def main() -> None:
        async with serving() as server:
            reader, writer = await connect(server)
            lines = ["GET /v1/stream HTTP/1.1"] + [f"{k}: {v}" for k, v in HANDSHAKE.items()]
            frame = Frame(Opcode.TEXT, b'{"input":"early bird"}').serialize(mask=True)
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + frame)
            await reader.readuntil(b"\r\n\r\n")
            messages = await Client(reader, writer).until_done()
            assert messages[-1]["text"] == "earlybird"

    run(main)


def test_message_over_the_limit_closes_1009() -> None:
    async def main() -> None:
        async with session() as (_, client):
            client.send(Opcode.TEXT, b"x" * (LIMIT + 1))
            assert await client.close_code() == CloseCode.MESSAGE_TOO_BIG
            assert await client.eof()
        async with session() as (_, client):
            # The limit is on the message: fragments count together.
            client.send(Opcode.TEXT, b"x" * 600, fin=False)
            client.send(Opcode.CONT, b"x" * 600)
            assert await client.close_code() == CloseCode.MESSAGE_TOO_BIG

    run(main)


def test_invalid_utf8_closes_1007_and_fragments_join_before_decoding() -> None:
    async def main() -> None:
        async with session() as (_, client):
            # "é" split between two fragments is valid once joined.
            body = json.dumps({"input": "caf\u00e9 ok"}, ensure_ascii=False).encode()
            cut = body.index(b"\xc3") + 1
            client.send(Opcode.TEXT, body[:cut], fin=False)
            client.send(Opcode.CONT, body[cut:])
            assert (await client.until_done())[-1]["text"] == "caf\u00e9ok"
            client.send(Opcode.TEXT, b'{"input": "\xff\xfe"}')
            assert await client.close_code() == CloseCode.INVALID_DATA
            assert await client.eof()

    run(main)


def test_ping_is_answered_with_its_payload() -> None:
    async def main() -> None:
        async with session() as (_, client):
            client.send(Opcode.PING, b"are you there")
            pong = await client.frame()
            assert (pong.opcode, pong.data) == (Opcode.PONG, b"are you there")
            client.send_json({"input": "still open"})
            assert (await client.until_done())[-1]["text"] == "stillopen"

    run(main)


def test_bad_messages_get_errors_and_the_connection_lives() -> None:
    async def main() -> None:
        async with session() as (_, client):
            client.send(Opcode.TEXT, b"{not json")
            bad = await client.message()
            assert bad["type"] == "error" and bad["ref"] is None
            assert bad["error"]["type"] == "invalid_request"
            assert "invalid JSON" in bad["error"]["message"]
            assert "request_id" not in bad

            client.send_json({"input": "", "ref": "r1"})
            empty = await client.message()
            assert (empty["ref"], empty["error"]["field"]) == ("r1", "input")

            client.send_json({"input": "x", "ref": "r2", "colour": "blue"})
            unknown = await client.message()
            assert (unknown["ref"], unknown["error"]["field"]) == ("r2", "colour")

            client.send(Opcode.BINARY, b'{"input": "x"}')
            binary = await client.message()
            assert "binary" in binary["error"]["message"]

            client.send_json({"input": "fine now", "ref": "r3"})
            messages = await client.until_done()
            assert messages[-1]["type"] == "done" and messages[-1]["ref"] == "r3"

    run(main)


def test_rate_limited_requests_get_the_limiter_error() -> None:
    async def main() -> None:
        async with session() as (_, client):
            client.send_json({"input": "x", "session_id": "throttled", "ref": "t"})
            refused = await client.message()
            assert refused["type"] == "error" and refused["ref"] == "t"
            assert refused["error"] == {"type": "rate_limited", "message": "slow down"}
            client.send_json({"input": "y", "session_id": "fine"})
            assert (await client.until_done())[-1]["text"] == "y"

    run(main)


def test_pipeline_failures_become_error_messages() -> None:
    async def main() -> None:
        async with session() as (_, client):
            client.send_json({"input": "one fail", "ref": "f"})
            messages = await client.until_done()
            assert [m["type"] for m in messages] == ["accepted", "chunk", "error"]
            error = messages[-1]
            assert (error["ref"], error["request_id"]) == ("f", "r0")
            assert error["error"]["type"] == "deadline_exceeded"
            assert error["error"]["message"] == "too slow (stage post)"

    run(main)


def test_concurrent_requests_interleave_each_in_order() -> None:
    async def main() -> None:
        streams = FakeStreams()
        streams.step = 0.01
        async with session(streams) as (_, client):
            client.send_json({"input": "hold a b", "ref": "slow"})
            client.send_json({"input": "c d e", "ref": "fast"})
            got: dict[str, list[dict[str, Any]]] = {"slow": [], "fast": []}
            order: list[str] = []
            while len(order) < 2:
                message = await client.message()
                got[message["ref"]].append(message)
                if message["type"] == "done":
                    order.append(message["ref"])
                    streams.release.set()  # the first held back until the second is done
            assert order == ["fast", "slow"]
            for ref, text in (("slow", "holdab"), ("fast", "cde")):
                kinds = [m["type"] for m in got[ref]]
                assert kinds == ["accepted", "chunk", "chunk", "chunk", "done"]
                assert [m["index"] for m in got[ref][1:-1]] == [0, 1, 2]
                assert got[ref][-1]["text"] == text

    run(main)


def test_a_client_that_does_not_read_stalls_its_stream() -> None:
    async def main() -> None:
        streams = FakeStreams()
        async with session(streams) as (_, client):
            client.send_json({"input": "flood"})
            await until(lambda: streams.yielded, "the stream to start", 10)
            # Not reading: socket buffers fill, then writes wait.
            stalled = await settled(lambda: streams.yielded)
            # Bounded by the kernel's socket buffers, not by the 6.5 GB on offer.
            assert 0 < stalled < 1000
            assert (await client.message())["type"] == "accepted"
            for _ in range(50):
                assert (await client.message())["type"] == "chunk"
            assert streams.yielded > stalled  # reading lets it run again

    run(main)


def test_disconnect_mid_stream_closes_the_stream_at_once() -> None:
    async def main() -> None:
        streams = FakeStreams()
        streams.step = 0.25  # 100 words: 25 s unless the disconnect closes it
        async with session(streams) as (server, client):
            client.send_json({"input": " ".join(["w"] * 100)})
            assert (await client.message())["type"] == "accepted"
            client.writer.transport.abort()
            await until(lambda: streams.closed, "the stream to close", 10)
            assert streams.closed == ["r0"]
            # The server serves on.
            status, _, _, again = await handshake(server)
            assert status == 101
            again.send_json({"input": "ok"})
            assert (await again.until_done())[-1]["text"] == "ok"

    run(main)


def test_client_close_is_echoed_and_cancels_requests() -> None:
    async def main() -> None:
        streams = FakeStreams()
        streams.step = 0.05
        async with session(streams) as (_, client):
            client.send_json({"input": " ".join(["w"] * 100)})
            assert (await client.message())["type"] == "accepted"
            client.send(Opcode.CLOSE, Close(CloseCode.NORMAL_CLOSURE, "bye").serialize())
            while (frame := await client.frame()).opcode is not Opcode.CLOSE:
                assert frame.opcode is Opcode.TEXT  # chunks already on their way
            assert Close.parse(frame.data).code == CloseCode.NORMAL_CLOSURE
            assert await client.eof()  # the server ends TCP after the handshake
            assert streams.closed == ["r0"]

    run(main)


def test_server_stop_lets_requests_finish_then_closes_1001() -> None:
    async def main() -> None:
        streams = FakeStreams()
        async with serving(streams) as server:
            status, _, _, client = await handshake(server)
            assert status == 101
            client.send_json({"input": "a b hold c", "ref": "inflight"})
            assert (await client.message())["type"] == "accepted"
            stopping = asyncio.ensure_future(server.stop(5.0))
            await asyncio.sleep(0)  # stop() begins: the session now refuses new requests
            client.send_json({"input": "too late", "ref": "late"})
            late = done = None
            while late is None or done is None:
                message = await client.message()
                if message["ref"] == "late":
                    late = message
                    streams.release.set()  # only now may the request in flight finish
                elif message["type"] == "done":
                    done = message
            assert late["error"]["type"] == "shutting_down"
            assert done["text"] == "abholdc"
            assert await client.close_code() == CloseCode.GOING_AWAY
            await asyncio.wait_for(stopping, 5)
            assert streams.closed == ["r0"]

    run(main)


def test_upgrade_pipelined_behind_a_request_is_refused() -> None:
    async def main() -> None:
        async with serving() as server:
            reader, writer = await connect(server)
            plain = b"GET /other HTTP/1.1\r\nhost: test\r\n\r\n"
            lines = ["GET /v1/stream HTTP/1.1"] + [f"{k}: {v}" for k, v in HANDSHAKE.items()]
            writer.write(plain + ("\r\n".join(lines) + "\r\n\r\n").encode())
            first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert first.startswith(b"HTTP/1.1 426")
            await reader.readexactly(len(b'{"plain":true}'))
            second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert second.startswith(b"HTTP/1.1 400")

    run(main)


# A message's model, resolved at the gateway as POST /v1/prompt resolves it


class ModelsApp(StreamApp):
    """``/v1/stream`` through the gateway's WebSocket style, over two models."""

    def __init__(self, streams: FakeStreams) -> None:
        super().__init__(streams)
        catalog = Catalog.build(
            [ModelConfig(name="alpha", aliases=["a"]), ModelConfig(name="beta")],
            InferenceConfig(),
        )
        self.api = websocket.WebSocketApi(
            streams, max_message=LIMIT, admission=Admission(None), models=Models(catalog)
        )

    def upgrade(self, request: Request) -> Reply | Switch | None:
        return self.api.upgrade(request)


def test_an_unknown_model_is_an_error_message_and_the_connection_lives() -> None:
    streams = FakeStreams()

    async def main() -> None:
        server = HttpServer(ModelsApp(streams), max_body=LIMIT)
        await server.start(bind("127.0.0.1", 0))
        try:
            status, _, _, client = await handshake(server)
            assert status == 101
            client.send_json({"input": "x", "model": "gamma", "ref": "g"})
            refused = await client.message()
            assert (refused["type"], refused["ref"]) == ("error", "g")
            assert "request_id" not in refused  # it never became a request
            error = refused["error"]
            assert (error["type"], error["field"]) == ("model_not_found", "model")
            assert "'gamma'" in error["message"]
            for message in (
                {"input": "by alias", "model": "a"},
                {"input": "by name", "model": "beta"},
                {"input": "by default"},
            ):
                client.send_json(message)
                assert (await client.until_done())[-1]["type"] == "done"
        finally:
            for writer in _writers:
                writer.close()
            _writers.clear()
            await server.stop(1.0)

    run(main)
    # The unknown one reached nothing; the others carry their model's key.
    assert [o.model if o is not None else "-" for o in streams.options] == [
        "alpha",
        "beta",
        "alpha",
    ]

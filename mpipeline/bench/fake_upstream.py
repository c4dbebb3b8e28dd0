"""A fast fake OpenAI-compatible model server: the upstream of ``mpipeline bench --upstream``.

It answers ``POST .../chat/completions`` the way OpenAI, vLLM or llama.cpp's
server do, non-streamed (one JSON body) or streamed (SSE over a chunked body:
a role chunk, one chunk per token, a finish chunk, a usage chunk when
``stream_options.include_usage`` asks, then ``[DONE]``). Tokens per reply
and the delays before the first token and between tokens are settings; a
request's ``max_tokens`` caps the tokens of its reply.

It must cost far less than the proxies it serves, or the bench would measure
it: so it is an ``asyncio.Protocol`` over httptools' C parser on uvloop, the
reply bytes are built once per token count, and a streamed reply is paced by
one timer callback per token, with no coroutine or task per request.
``GET /readyz`` answers 200, so the bench's readiness check works on it too.

Run as ``python -m mpipeline.bench.fake_upstream --port N [--tokens 16]
[--first-token-ms 0] [--token-delay-ms 0]``; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

import httptools
import msgspec
import uvloop

TOKEN = "tok "
MODEL = "fake-model"
_JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
_READY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 18\r\n\r\n"
_READY += b'{"status":"ready"}'
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


@dataclass(frozen=True)
class Settings:
    """What every reply looks like (a request's ``max_tokens`` may shorten it)."""

    tokens: int = 16
    first_token_ms: float = 0.0
    token_delay_ms: float = 0.0


class _Request(msgspec.Struct):
    """The only fields of a chat completion request the fake reads."""

    stream: bool = False
    max_tokens: int | None = None
    stream_options: dict[str, bool] | None = None


_DECODE = msgspec.json.Decoder(_Request)
_ENCODE = msgspec.json.Encoder().encode
_ID = "chatcmpl-fake"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _event(obj: dict[str, object]) -> bytes:
    return _chunk(b"data: " + _ENCODE(obj) + b"\n\n")


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens}


@lru_cache(maxsize=64)
def json_reply(tokens: int) -> bytes:
    """The whole non-streamed response (head and body) for ``tokens`` tokens."""
    body = _ENCODE(
        {
            "id": _ID,
            "object": "chat.completion",
            "created": 0,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": TOKEN * tokens},
                    "finish_reason": "stop",
                }
            ],
            "usage": _usage(tokens),
        }
    )
    return _JSON_HEAD % len(body) + body


def _choice(delta: dict[str, str], finish: str | None = None) -> dict[str, object]:
    base = {"id": _ID, "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    return base | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


STREAM_OPENING = _SSE_HEAD + _event(_choice({"role": "assistant", "content": ""}))
STREAM_TOKEN = _event(_choice({"content": TOKEN}))


@lru_cache(maxsize=64)
def stream_closing(tokens: int, usage: bool) -> bytes:
    """What follows the last token: finish, usage (when asked for), ``[DONE]``, the end."""
    out = _event(_choice({}, "stop"))
    if usage:
        base = {"id": _ID, "object": "chat.completion.chunk", "created": 0, "model": MODEL}
        out += _event(base | {"choices": [], "usage": _usage(tokens)})
    return out + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class _Connection(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer from prebuilt bytes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._reply(_BAD)
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        # A client that went away mid-stream: stop its timer chain.
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url, self.url = self.url, b""
        raw, self.body = b"".join(self.body), []
        if self.parser.get_method() == b"GET":
            self._reply(_READY if url.startswith(b"/readyz") else _NOT_FOUND)
        elif not url.split(b"?", 1)[0].endswith(b"/chat/completions"):
            self._reply(_NOT_FOUND)
        else:
            self._answer(raw)

    # Replies

    def _reply(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _answer(self, raw: bytes) -> None:
        try:
            req = _DECODE.decode(raw)
        except msgspec.DecodeError:
            self._reply(_BAD)
            return
        tokens = self.settings.tokens
        if req.max_tokens is not None and req.max_tokens >= 0:
            tokens = min(tokens, req.max_tokens)
        if not req.stream:
            delay = self.settings.first_token_ms + self.settings.token_delay_ms * max(0, tokens - 1)
            if delay > 0:
                self.timer = self.loop.call_later(delay / 1e3, self._late_json, tokens)
            else:
                self._reply(json_reply(tokens))
            return
        usage = bool(req.stream_options and req.stream_options.get("include_usage"))
        self._reply(STREAM_OPENING)
        self._stream(tokens, usage, 0)

    def _late_json(self, tokens: int) -> None:
        self.timer = None
        self._reply(json_reply(tokens))

    def _stream(self, tokens: int, usage: bool, sent: int) -> None:
        """Send tokens until one must wait for its delay; then come back by timer."""
        self.timer = None
        s = self.settings
        while sent < tokens:
            delay = s.first_token_ms if sent == 0 else s.token_delay_ms
            if delay > 0:
                self.timer = self.loop.call_later(
                    delay / 1e3, self._send_token, tokens, usage, sent
                )
                return
            self._reply(STREAM_TOKEN)
            sent += 1
        self._reply(stream_closing(tokens, usage))

    def _send_token(self, tokens: int, usage: bool, sent: int) -> None:
        self._reply(STREAM_TOKEN)
        sent += 1
        if sent >= tokens:
            self.timer = None
            self._reply(stream_closing(tokens, usage))
            return
        delay = self.settings.token_delay_ms
        if delay > 0:
            self.timer = self.loop.call_later(delay / 1e3, self._send_token, tokens, usage, sent)
        else:
            self._stream(tokens, usage, sent)


async def serve(host: str, port: int, settings: Settings, stop: asyncio.Event) -> None:
    """Serve on ``host:port`` until ``stop`` is set."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(settings), host, port, backlog=4096)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mpipeline.bench.fake_upstream", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, default=Settings.tokens, help="tokens per reply")
    parser.add_argument("--first-token-ms", type=float, default=0.0, help="delay to token 1")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="delay between tokens")
    args = parser.parse_args(argv)
    settings = Settings(args.tokens, args.first_token_ms, args.token_delay_ms)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(args.host, args.port, settings, stop)

    uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

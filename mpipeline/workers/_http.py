"""What the two HTTP upstreams share: the key, the client, and one call's I/O.

Each call is one attempt (no transport retries, no redirects) whose every
failure leaves as an ``UpstreamFailure`` classified by ``_failures``, so the
workers hold only their API's request and reply shapes. The client is the
workers' own (``_client``: why, with the numbers, is there); a streamed
reply is read a network read at a time, and each read's SSE events are
decoded together (``sse_events``), so the tokens that arrive together leave
together.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from mpipeline.config import TimeoutsConfig, UpstreamConfig
from mpipeline.errors import ConfigError, UpstreamFailure
from mpipeline.messages import Assembled
from mpipeline.workers._client import Client, RequestHead, Timeouts
from mpipeline.workers._conn import Conn
from mpipeline.workers._failures import protocol_failure, status_failure
from mpipeline.workers.base import WorkerContext
from mpipeline.workers.sse import SSEDecoder, SSEEvent

__all__ = [
    "ApiKey",
    "build_client",
    "drain",
    "fetch",
    "read_api_key",
    "read_error_body",
    "send",
    "sse_events",
    "stream_end",
    "stream_timeout",
    "unary_timeout",
]

# The shard enforces the phase timeouts around each call; the client's read
# timeout is only a backstop behind them, so it must fire later than the shard's own timers.
BACKSTOP_FACTOR = 1.25
# Longest wait for the end of a body after its stream's terminator.
DRAIN_S = 1.0
# Enough of an error body to find its type/code; the rest is free text we never use.
ERROR_BODY_CAP = 64 * 1024
# A non-streamed reply larger than this is not a chat completion.
MAX_BODY = 64 * 1024 * 1024
# Header-safe: visible ASCII only, so the key can never split or forge a header line.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


class ApiKey:
    """An API key that never prints: ``repr``/``str`` are redacted, so a key held
    by a worker cannot reach a log line or a traceback's locals by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The key itself, for the one header that carries it."""
        return self._value

    def __repr__(self) -> str:
        return "ApiKey('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        # Keys are read from the environment in the process that uses them; one
        # must never travel in a pickle (a ReplicaSpec, a crash report).
        raise TypeError("an ApiKey cannot be pickled")


def read_api_key(env_name: str | None) -> ApiKey | None:
    """Read the key from the environment variable named ``env_name`` (None or "": no key;
    TOML has no null, so a config file says ``api_key_env = ""`` for a keyless server).

    :raises ConfigError: the variable is unset or empty, or holds characters an
        HTTP header cannot carry; the message names the variable, never its value
    """
    if not env_name:
        return None
    value = os.environ.get(env_name, "")
    if not value:
        raise ConfigError(f"environment variable {env_name} (api_key_env) is not set or empty")
    if not _KEY_CHARS.fullmatch(value):
        raise ConfigError(
            f"environment variable {env_name} (api_key_env) holds characters not allowed "
            "in an HTTP header (whitespace or non-ASCII)"
        )
    return ApiKey(value)


def build_client(config: UpstreamConfig, headers: Mapping[str, str]) -> Client:
    """One keep-alive pool per shard and upstream, sized to its concurrency.

    No transport retries and no redirects: the shard's retry loop is the only
    one (RELIABILITY 1.5), and a redirect would resend the key to another host.
    HTTP/1.1 only, because each call is one stream and h2 would add a dependency
    for no gain at this fan-out. Proxies come from the environment (``_client``).

    :raises ConfigError: the URL, a header or the environment's proxy is unusable
    """
    return Client(
        config.base_url,
        headers=headers,
        max_connections=config.max_concurrency,
        timeout=stream_timeout(config.timeouts),
    )


def stream_timeout(t: TimeoutsConfig) -> Timeouts:
    """Timeouts for a streamed call: no read waits longer than the longest phase gap."""
    return Timeouts(
        connect=t.connect_s, read=max(t.first_token_s, t.between_tokens_s) * BACKSTOP_FACTOR
    )


def unary_timeout(t: TimeoutsConfig) -> Timeouts:
    """Timeouts for a non-streamed call, whose head may come only after the whole reply."""
    return Timeouts(connect=t.connect_s, read=t.total_s * BACKSTOP_FACTOR)


async def send(client: Client, request: bytes, read_timeout: float) -> Conn:
    """Send ``request`` and return its connection once the answer is known to be a 200.

    The caller reads the body and must ``client.release`` the connection.

    :raises UpstreamFailure: the call failed before a 200 arrived, or another status came
    """
    conn = await client.open(request, read_timeout)
    if conn.status == 200:
        return conn
    try:
        raw = await read_error_body(conn)
    except UpstreamFailure:
        raw = b""
    finally:
        client.release(conn)
    raise status_failure(conn.status, conn.headers(), raw)


async def fetch(client: Client, request: bytes, read_timeout: float) -> bytes:
    """Send ``request`` and return the whole body of the 200 that answers it.

    :raises UpstreamFailure: the call failed, another status came, or the body was cut
    """
    conn = await send(client, request, read_timeout)
    try:
        parts: list[bytes] = []
        size = 0
        while data := await conn.read():
            parts.append(data)
            size += len(data)
            if size > MAX_BODY:
                raise protocol_failure("upstream reply is too large")
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        client.release(conn)


async def read_error_body(conn: Conn) -> bytes:
    """At most ``ERROR_BODY_CAP`` bytes of an error response."""
    parts: list[bytes] = []
    size = 0
    while size < ERROR_BODY_CAP and (data := await conn.read()):
        parts.append(data)
        size += len(data)
    return b"".join(parts)[:ERROR_BODY_CAP]


def sse_events(decoder: SSEDecoder, data: bytes) -> list[SSEEvent]:
    """The events one network read completed.

    :raises UpstreamFailure: the bytes are not an event stream
    """
    try:
        return decoder.feed(data)
    except ValueError:
        raise protocol_failure("upstream sent malformed SSE") from None


def stream_end(decoder: SSEDecoder) -> UpstreamFailure:
    """What a stream's body that ended before its terminator means: cut mid-event, or not."""
    try:
        decoder.finish()
    except ValueError:
        return protocol_failure("upstream response was truncated")
    return protocol_failure("upstream stream ended early")


async def drain(client: Client, conn: Conn) -> None:
    """After a stream's terminator: read what follows (normally just the chunked-body
    end), so the connection can go back to the pool instead of being closed.

    Bounded by ``DRAIN_S``: a server that keeps talking after its terminator
    loses its connection, not our time. Errors here are moot: the reply is whole.
    """
    if not conn.done:
        try:
            async with asyncio.timeout(DRAIN_S):
                while await conn.read():
                    pass
        except (TimeoutError, UpstreamFailure):
            pass
    client.release(conn)


T = TypeVar("T")


def decode(decoder: msgspec.json.Decoder[T], data: bytes | str) -> T:
    """One JSON reply or event from an upstream; malformed JSON is a protocol failure."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError:
        raise protocol_failure("upstream sent malformed JSON") from None


class HttpUpstream:
    """What the OpenAI and Anthropic upstreams share: the limits the shard reads,
    the endpoint, the key read at ``start`` and one keep-alive pool per shard.
    Subclasses name their ``path`` and the headers that carry the key."""

    remote = True
    path = ""

    def __init__(
        self, config: UpstreamConfig, ctx: WorkerContext | None = None, *, name: str
    ) -> None:
        # ctx is part of every upstream's signature; an HTTP client needs nothing from it.
        self.name = name
        self.timeouts = config.timeouts
        self.max_concurrency = config.max_concurrency
        self._config = config
        self._client: Client | None = None
        self._stream_head: RequestHead | None = None
        self._unary_head: RequestHead | None = None
        self._stream_read_s = stream_timeout(config.timeouts).read
        self._unary_read_s = unary_timeout(config.timeouts).read

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={self._config.model!r})"

    def _headers(self, key: ApiKey | None) -> dict[str, str]:
        """The headers of every request, the key's among them."""
        raise NotImplementedError

    def _body(self, job: Assembled, stream: bool) -> bytes:
        """The API's request body for ``job``."""
        raise NotImplementedError

    async def _open_stream(self, job: Assembled) -> tuple[Client, Conn]:
        """Start the streaming call: its connection once a 200 event stream answers.

        The caller reads it and must ``release`` it (``drain`` after the terminator).

        :raises UpstreamFailure: the call failed, or the reply is not an event stream
        """
        client = self._require_client()
        assert self._stream_head is not None
        request = self._stream_head.render(self._body(job, stream=True))
        conn = await send(client, request, self._stream_read_s)
        ctype = conn.header(b"content-type")
        if ctype and not ctype.lower().startswith("text/event-stream"):
            client.release(conn)
            raise protocol_failure("upstream sent malformed SSE (wrong content-type)")
        return client, conn

    async def _fetch(self, job: Assembled, decoder: msgspec.json.Decoder[T]) -> T:
        """The non-streaming call's reply, decoded.

        :raises UpstreamFailure: the call failed, or the reply is not the API's JSON
        """
        return decode(decoder, await self._fetch_body(job))

    async def _fetch_body(self, job: Assembled) -> bytes:
        """The non-streaming call's reply, as the upstream sent it.

        :raises UpstreamFailure: the call failed, or another status than 200 came
        """
        client = self._require_client()
        assert self._unary_head is not None
        request = self._unary_head.render(self._body(job, stream=False))
        return await fetch(client, request, self._unary_read_s)

    async def start(self) -> None:
        """Read the key and open the connection pool.

        :raises ConfigError: the key's environment variable is unset or unusable,
            or the URL or the environment's proxy is
        """
        client = build_client(self._config, self._headers(read_api_key(self._config.api_key_env)))
        # identity: a compressed body would need a decoder for no gain on loopback or LAN.
        self._stream_head = client.request_head(
            self.path, {"accept": "text/event-stream", "accept-encoding": "identity"}
        )
        self._unary_head = client.request_head(
            self.path, {"accept": "application/json", "accept-encoding": "identity"}
        )
        old, self._client = self._client, client
        if old is not None:
            await old.close()

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def _require_client(self) -> Client:
        if self._client is None:
            raise RuntimeError(f"upstream {self.name} used before start()")
        return self._client

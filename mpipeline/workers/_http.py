"""What the two HTTP upstreams share: the key, the client, and one call's I/O.

Each call is one attempt (no transport retries, no redirects) whose every
failure leaves as an ``UpstreamFailure`` classified by ``_failures``, so the
workers hold only their API's request and reply shapes.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

import httpx
import msgspec

from mpipeline.config import TimeoutsConfig, UpstreamConfig
from mpipeline.errors import ConfigError
from mpipeline.messages import Assembled
from mpipeline.workers._failures import protocol_failure, status_failure, transport_failure
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
    "stream_timeout",
    "unary_timeout",
]

# The shard enforces the phase timeouts around each call; httpx's read timeout is
# only a backstop behind them, so it must fire later than the shard's own timers.
BACKSTOP_FACTOR = 1.25
# Longest wait for the end of a body after its stream's terminator.
DRAIN_S = 1.0
# Enough of an error body to find its type/code; the rest is free text we never use.
ERROR_BODY_CAP = 64 * 1024
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


def build_client(config: UpstreamConfig, headers: dict[str, str]) -> httpx.AsyncClient:
    """One keep-alive pool per shard and upstream, sized to its concurrency.

    No transport retries and no redirects: the shard's retry loop is the only
    one (RELIABILITY 1.5), and a redirect would resend the key to another host.
    HTTP/1.1 only, because each call is one stream and h2 would add a dependency
    for no gain at this fan-out. ``trust_env`` stays on for CA-bundle variables;
    with an explicit transport httpx takes no proxy from the environment.
    """
    t = config.timeouts
    limits = httpx.Limits(
        max_connections=config.max_concurrency,
        max_keepalive_connections=config.max_concurrency,
    )
    transport = httpx.AsyncHTTPTransport(retries=0, http1=True, http2=False, limits=limits)
    return httpx.AsyncClient(
        transport=transport,
        headers=headers,
        timeout=stream_timeout(t),
        follow_redirects=False,
    )


def stream_timeout(t: TimeoutsConfig) -> httpx.Timeout:
    """Timeouts for a streamed call: no read waits longer than the longest phase gap."""
    read = max(t.first_token_s, t.between_tokens_s) * BACKSTOP_FACTOR
    return httpx.Timeout(connect=t.connect_s, read=read, write=t.connect_s, pool=t.connect_s)


def unary_timeout(t: TimeoutsConfig) -> httpx.Timeout:
    """Timeouts for a non-streamed call, whose headers may come only after the whole reply."""
    read = t.total_s * BACKSTOP_FACTOR
    return httpx.Timeout(connect=t.connect_s, read=read, write=t.connect_s, pool=t.connect_s)


async def send(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    phases: httpx.Timeout,
) -> httpx.Response:
    """POST ``body`` and return the open response once it is known to be a 200.

    The caller reads the body and must ``aclose()`` the response.

    :raises UpstreamFailure: the call failed before a 200 arrived, or another status came
    """
    request = client.build_request("POST", url, content=body, headers=headers, timeout=phases)
    try:
        response = await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise transport_failure(exc, in_body=False) from None
    if response.status_code == 200:
        return response
    try:
        raw = await read_error_body(response)
    except httpx.HTTPError:
        raw = b""
    finally:
        await response.aclose()
    raise status_failure(response.status_code, response.headers, raw)


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    phases: httpx.Timeout,
) -> bytes:
    """POST ``body`` and return the whole body of the 200 that answers it.

    :raises UpstreamFailure: the call failed, another status came, or the body was cut
    """
    response = await send(client, url, body, headers, phases)
    try:
        return await response.aread()
    except httpx.HTTPError as exc:
        raise transport_failure(exc, in_body=True) from None
    finally:
        await response.aclose()


async def sse_events(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    phases: httpx.Timeout,
    *,
    last: Callable[[SSEEvent], bool],
) -> AsyncGenerator[SSEEvent, None]:
    """POST ``body`` and yield the reply's SSE events until the one ``last`` accepts
    (the API's terminator, not yielded); then the connection goes back to the pool.

    Close it with ``contextlib.aclosing`` so that a caller who stops early (a
    client went away) closes the connection at once, which is how the upstream
    learns to stop generating.

    :raises UpstreamFailure: the call failed, the reply is not an event stream,
        or it ended (cut mid-event or not) before its terminator
    """
    response = await send(client, url, body, headers, phases)
    try:
        ctype = response.headers.get("content-type", "")
        if ctype and not ctype.lower().startswith("text/event-stream"):
            raise protocol_failure("upstream sent malformed SSE (wrong content-type)")
        decoder = SSEDecoder(strict=True)
        chunks = response.aiter_bytes()
        async for raw in chunks:
            try:
                events = decoder.feed(raw)
            except ValueError:
                raise protocol_failure("upstream sent malformed SSE") from None
            for event in events:
                if last(event):
                    await drain(chunks)
                    return
                yield event
        try:
            decoder.finish()
        except ValueError:
            raise protocol_failure("upstream response was truncated") from None
        raise protocol_failure("upstream stream ended early")
    except httpx.HTTPError as exc:
        raise transport_failure(exc, in_body=True) from None
    finally:
        await response.aclose()


async def read_error_body(response: httpx.Response) -> bytes:
    """At most ``ERROR_BODY_CAP`` bytes of an error response."""
    parts: list[bytes] = []
    size = 0
    async for part in response.aiter_bytes():
        parts.append(part)
        size += len(part)
        if size >= ERROR_BODY_CAP:
            break
    return b"".join(parts)[:ERROR_BODY_CAP]


async def drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows a stream's terminator (normally just the chunked-body
    end), so the connection can go back to the pool instead of being closed.

    Bounded by ``DRAIN_S``: a server that keeps talking after its terminator
    loses its connection, not our time. Errors here are moot: the reply is whole.
    """
    try:
        async with asyncio.timeout(DRAIN_S):
            async for _ in chunks:
                pass
    except (TimeoutError, httpx.HTTPError):
        pass


T = TypeVar("T")


def decode(decoder: msgspec.json.Decoder[T], data: bytes | str) -> T:
    """One JSON reply or event from an upstream; malformed JSON is a protocol failure."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError:
        raise protocol_failure("upstream sent malformed JSON") from None


class HttpUpstream:
    """What the OpenAI and Anthropic upstreams share: the limits the shard reads,
    the endpoint URL, the key read at ``start`` and one keep-alive pool per shard.
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
        self._url = config.base_url.rstrip("/") + self.path
        self._client: httpx.AsyncClient | None = None
        self._stream_timeout = stream_timeout(config.timeouts)
        self._unary_timeout = unary_timeout(config.timeouts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, model={self._config.model!r})"

    def _headers(self, key: ApiKey | None) -> dict[str, str]:
        """The headers of every request, the key's among them."""
        raise NotImplementedError

    def _body(self, job: Assembled, stream: bool) -> bytes:
        """The API's request body for ``job``."""
        raise NotImplementedError

    def _events(
        self, job: Assembled, last: Callable[[SSEEvent], bool]
    ) -> AsyncGenerator[SSEEvent, None]:
        """The streaming call's SSE events; close it with ``contextlib.aclosing``."""
        headers = {"accept": "text/event-stream", "accept-encoding": "identity"}
        body = self._body(job, stream=True)
        client = self._require_client()
        return sse_events(client, self._url, body, headers, self._stream_timeout, last=last)

    async def _fetch(self, job: Assembled, decoder: msgspec.json.Decoder[T]) -> T:
        """The non-streaming call's reply, decoded.

        :raises UpstreamFailure: the call failed, or the reply is not the API's JSON
        """
        headers = {"accept": "application/json"}
        body = self._body(job, stream=False)
        raw = await fetch(self._require_client(), self._url, body, headers, self._unary_timeout)
        return decode(decoder, raw)

    async def start(self) -> None:
        """Read the key and open the connection pool.

        :raises ConfigError: the key's environment variable is unset or unusable
        """
        headers = self._headers(read_api_key(self._config.api_key_env))
        if self._client is not None:
            await self._client.aclose()
        self._client = build_client(self._config, headers)

    async def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError(f"upstream {self.name} used before start()")
        return self._client

"""The workers' HTTP client: keep-alive HTTP/1.1 to one upstream, direct or through a proxy.

Why our own, on httptools like the gateway's server: the client is most of
what a proxied call costs a shard. ``bench/upstream_clients.py`` measured
each candidate alone, one pinned core, 32 calls in flight to a fast local
upstream (CPU per call, JSON / SSE stream of 16 tokens; bench/RESULTS.md):
httpx 1,409 / 1,592 µs (httpcore's pool scans every idle connection on each
request, and anyio's ``current_task`` runs on every read), httpx over the
aiohttp transport 237 / 320, httpx2 400 / 641, aiohttp 66 / 137, and the
``openai`` worker on this client 19 / 78, its request building and reply
decoding included (a bare httptools loop, the floor: 11 / 72).

What it does, and what it leaves out on purpose:

* HTTP/1.1, one exchange per connection at a time. Idle connections are kept
  up to ``max_idle`` (the upstream's ``max_concurrency``: the shard never has
  more calls in flight), and dropped the moment the server closes one, so a
  request never meets a connection known to be dead. No pipelining, no h2.
* TLS with certificate and host name verification, SNI and ALPN ``http/1.1``,
  from ``ssl.create_default_context()``: the system's CAs, or the ones
  ``SSL_CERT_FILE``/``SSL_CERT_DIR`` name.
* Proxies from the environment, as aiohttp's ``trust_env`` (and curl) take
  them: ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` (lower case too), an
  ``http://`` proxy whose ``user:password`` becomes ``Proxy-Authorization``,
  and ``NO_PROXY``. Loopback addresses never go through a proxy (Go's rule),
  so a local model server stays local. An ``https://`` upstream is reached
  through a ``CONNECT`` tunnel; an ``http://`` one in absolute form.
* One timeout here, ``connect_s``, over DNS, TCP, the tunnel and TLS; reads
  have the backstop of ``_conn``; the shard times the phases.
* No redirects (one would resend the key elsewhere), no retries (the shard's
  loop is the only one, RELIABILITY 1.5), no cookies, no compression.

The request head is rendered once per upstream (``RequestHead``); a call adds
its ``content-length`` and body. The key is in those bytes, so the object
that holds them never prints them.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from mpipeline.errors import ConfigError, UpstreamFailure
from mpipeline.workers._conn import Conn
from mpipeline.workers._failures import broken_failure, classify, transport_failure

__all__ = ["Client", "RequestHead", "Timeouts", "proxy_for"]

USER_AGENT = "mpipeline"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The proxy's answer to CONNECT is a head only; a bigger one is not a proxy's.
_MAX_TUNNEL_HEAD = 16 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: ``connect`` (DNS, TCP, tunnel, TLS), ``read`` (longest silence mid-call)."""

    connect: float
    read: float


class _Headers(dict[str, str]):
    """Request headers; ``repr`` shows their names only (a value may be a key)."""

    def __repr__(self) -> str:
        return f"_Headers({sorted(self)})"


class RequestHead:
    """A request's bytes up to its ``content-length``; ``render`` adds it and the body."""

    __slots__ = ("_head", "_what")

    def __init__(self, head: bytes, what: str) -> None:
        self._head = head
        self._what = what

    def render(self, body: bytes) -> bytes:
        return self._head + b"content-length: %d\r\n\r\n" % len(body) + body

    def __repr__(self) -> str:
        return f"RequestHead({self._what})"  # never the bytes: they hold the key

    def __reduce__(self) -> Any:
        raise TypeError("a RequestHead cannot be pickled")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# NO_PROXY as urllib reads it (domains, host:port, "*"); typeshed leaves it out.
_bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]


def proxy_for(scheme: str, host: str, port: int) -> SplitResult | None:
    """The environment's proxy for ``scheme://host:port``, or None to go direct.

    :raises ConfigError: the proxy variable holds something other than an http:// URL
    """
    if _is_loopback(host):
        return None
    proxies = urllib.request.getproxies_environment()
    url = proxies.get(scheme) or proxies.get("all")
    if not url or _bypass(f"{host}:{port}", proxies):
        return None
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme != "http" or not parts.hostname:
        # Never the value: a proxy URL may hold a password.
        raise ConfigError(
            f"the {scheme} proxy set in the environment ({scheme.upper()}_PROXY or ALL_PROXY) "
            "is not an http:// URL; mpipeline speaks plain HTTP to proxies"
        )
    return parts


def _check_header(name: str, value: str) -> None:
    if any(c in value for c in "\r\n\0") or any(c in name for c in "\r\n\0: "):
        raise ConfigError(f"upstream header {name!r} holds a line break or NUL")


class Client:
    """Keep-alive connections to the origin of ``base_url``, sending ``headers`` on every call.

    ``timeout.read`` is the default for ``open``. At most ``max_connections``
    are kept for reuse: the shard never has more calls in flight.

    :raises ConfigError: ``base_url`` is not an http(s) URL, a header holds a
        line break, or the environment's proxy is unusable
    """

    # The policy, as attributes a test can read: see the module's docstring.
    follow_redirects = False
    retries = 0
    http2 = False

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str],
        max_connections: int,
        timeout: Timeouts,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in _DEFAULT_PORTS or not url.hostname:
            raise ConfigError("an upstream base_url must be an http:// or https:// URL")
        if url.username or url.password:
            raise ConfigError("an upstream base_url must not hold credentials (use api_key_env)")
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port or _DEFAULT_PORTS[url.scheme]
        self._base_path = url.path.rstrip("/")
        default = self.port == _DEFAULT_PORTS[self.scheme]
        name = f"[{self.host}]" if ":" in self.host else self.host
        self._authority = name if default else f"{name}:{self.port}"
        self._hostport = f"{name}:{self.port}"
        self._ssl: ssl.SSLContext | None = None
        if self.scheme == "https":
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        # Only the proxy's address and its credentials header are kept (its URL
        # may hold a password), and the headers print their names only.
        proxy = proxy_for(self.scheme, self.host, self.port)
        self._proxy: tuple[str, int] | None = None
        self._proxy_auth: _Headers = _Headers()
        if proxy is not None:
            assert proxy.hostname is not None
            self._proxy = (proxy.hostname, proxy.port or 80)
            if proxy.username is not None:
                user = unquote(proxy.username) + ":" + unquote(proxy.password or "")
                basic = "Basic " + base64.b64encode(user.encode()).decode()
                self._proxy_auth["proxy-authorization"] = basic
        for name, value in headers.items():
            _check_header(name, value)
        self._headers = _Headers(headers)
        self.max_connections = max_connections
        self.timeout = timeout
        self._idle: list[Conn] = []
        self._closed = False

    def __repr__(self) -> str:
        via = ", via a proxy" if self._proxy is not None else ""
        return f"Client({self.scheme}://{self._authority}{via})"

    @property
    def proxied(self) -> bool:
        return self._proxy is not None

    def request_head(self, path: str, headers: Mapping[str, str]) -> RequestHead:
        """``POST`` to ``base_url``'s path + ``path``, with the client's and these
        ``headers``, up to its length.

        :raises ConfigError: a header holds a line break (it could forge another)
        """
        target = self._base_path + path
        if self._proxy is not None and self._ssl is None:
            # A plain-HTTP request through a proxy names its whole URL.
            target = f"{self.scheme}://{self._authority}{target}"
        lines = [f"POST {target} HTTP/1.1", f"host: {self._authority}", f"user-agent: {USER_AGENT}"]
        all_headers = self._headers | dict(headers)
        if self._ssl is None:
            all_headers |= self._proxy_auth
        for name, value in all_headers.items():
            _check_header(name, value)
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        return RequestHead(head, f"POST {self._base_path + path}")

    async def open(self, request: bytes, read_timeout: float | None = None) -> Conn:
        """Send ``request`` on an idle connection (or a new one) and wait for its head.

        Give the connection back with ``release`` however the exchange ends.

        :raises UpstreamFailure: the connection, its TLS or its proxy failed, or no head came
        """
        idle = self._idle
        conn = idle.pop() if idle else await self._connect()
        conn.start(request, self.timeout.read if read_timeout is None else read_timeout)
        try:
            await conn.head()
        except BaseException:
            conn.abort()
            raise
        return conn

    def release(self, conn: Conn) -> None:
        """Keep ``conn`` for the next call if its exchange ended cleanly, else close it.

        A call cut short (cancelled, failed, a body left unread) closes its
        connection at once: that is how the upstream learns to stop generating.
        """
        if not conn.busy:
            return
        if conn.reusable and not self._closed and len(self._idle) < self.max_connections:
            conn.end()
            self._idle.append(conn)
        elif conn.done:
            conn.close()
        else:
            conn.abort()

    async def close(self) -> None:
        """Close the idle connections; calls in flight close theirs when they end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _lost(self, conn: Conn) -> None:
        if not conn.busy and conn in self._idle:
            self._idle.remove(conn)

    async def _connect(self) -> Conn:
        loop = asyncio.get_running_loop()
        conn = Conn(loop, self._lost)
        proxy = self._proxy
        try:
            async with asyncio.timeout(self.timeout.connect):
                if proxy is None:
                    hostname = self.host if self._ssl is not None else None
                    await loop.create_connection(
                        lambda: conn, self.host, self.port, ssl=self._ssl, server_hostname=hostname
                    )
                elif self._ssl is None:
                    await loop.create_connection(lambda: conn, *proxy)
                else:
                    await self._tunnel(loop, proxy, conn)
        except OSError as exc:  # TimeoutError, ssl.SSLError and socket.gaierror among them
            raise transport_failure(exc, in_body=False) from None
        return conn

    async def _tunnel(
        self, loop: asyncio.AbstractEventLoop, proxy: tuple[str, int], conn: Conn
    ) -> None:
        """Reach an https:// upstream through the proxy: CONNECT, then TLS inside."""
        assert self._ssl is not None
        transport, tunnel = await loop.create_connection(lambda: _Tunnel(loop), *proxy)
        try:
            where = self._hostport
            lines = [f"CONNECT {where} HTTP/1.1", f"host: {where}"]
            lines += [f"{name}: {value}" for name, value in self._proxy_auth.items()]
            transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await tunnel.answered()
            tls = await loop.start_tls(transport, conn, self._ssl, server_hostname=self.host)
        except BaseException:
            transport.abort()
            raise
        if tls is None:
            raise broken_failure(in_body=False)
        conn.connection_made(tls)


class _Tunnel(asyncio.Protocol):
    """Reads the proxy's answer to ``CONNECT``: a head, and nothing after it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._buf = bytearray()
        self._done: asyncio.Future[bytes | None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._done.done() and (
            b"\r\n\r\n" in self._buf or len(self._buf) > _MAX_TUNNEL_HEAD
        ):
            self._done.set_result(bytes(self._buf))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_result(None)

    async def answered(self) -> None:
        """Wait for a 200 to ``CONNECT``, after which TLS takes the socket over.

        :raises UpstreamFailure: the proxy refused, closed, or sent something else
        """
        head = await self._done
        if head is None:
            raise broken_failure(in_body=False)
        status_line, _, rest = head.partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        end = head.find(b"\r\n\r\n")
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise broken_failure(in_body=False, protocol=True)
        status = int(parts[1])
        if status != 200:
            raise _refused(status)
        if end < 0 or end + 4 != len(head):
            raise broken_failure(in_body=False, protocol=True)


def _refused(status: int) -> UpstreamFailure:
    # A 407 is our configuration; a 5xx the proxy's trouble reaching the upstream.
    return classify(status, f"upstream proxy refused the tunnel (HTTP {status})")

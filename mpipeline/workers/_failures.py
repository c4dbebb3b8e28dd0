"""What an upstream's failure means: one table from status (or error type) to flags.

Everything the HTTP client raises or answers becomes an ``UpstreamFailure``
here, at the edge (httpcore's ``map_exceptions`` idea), so the shard's retry
loop and circuit breaker read three flags (``retryable``, ``counts``,
``retry_after_s``) instead of catching ``OSError``, ``ssl.SSLError`` or a
library's exceptions. Messages are fixed text, the status, and at most one
short machine-readable error ``type``/``code`` of the upstream: never its free
text (OpenAI's 401 message quotes part of the key), a header, a URL or the
prompt, because a failure's message reaches logs, the DLQ and the client.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
import ssl
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

import msgspec

from mpipeline.errors import ErrorCode, UpstreamFailure

if TYPE_CHECKING:
    import httpx

__all__ = [
    "ERROR_TYPE_STATUS",
    "broken_failure",
    "classify",
    "error_failure",
    "error_label",
    "invalid_request",
    "parse_retry_after",
    "protocol_failure",
    "read_timeout_failure",
    "status_failure",
    "transport_failure",
]

logger = logging.getLogger(__name__)

# An upstream error type/code short and tame enough to show a client.
_SAFE_LABEL = re.compile(r"[a-z0-9_.-]{1,64}")

# Statuses another attempt may cure (all of 5xx is treated so too).
_RETRYABLE: Final = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
# The request's own fault: neither retried nor counted against the upstream. Any
# other 4xx is treated so too, except 401/403: a bad key fails every call, which
# is exactly what the circuit breaker should notice.
_FAULT_OF_CALLER: Final = frozenset({400, 404, 413, 422})

# Anthropic's error types (docs: "Errors") and OpenAI's common ones, by the HTTP
# status they stand for, so an error inside a 200 stream is classified like one.
ERROR_TYPE_STATUS: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "api_error": 500,
    "server_error": 500,
    "overloaded_error": 529,
}


def status_failure(status: int, headers: Mapping[str, str], body: bytes) -> UpstreamFailure:
    """Classify a non-200 answer by its status (and Retry-After)."""
    label = error_label(_error_object(body))
    message = f"upstream answered HTTP {status}" + (f" ({label})" if label else "")
    retry_after = parse_retry_after(headers) if status in (429, 503) else None
    return classify(status, message, retry_after_s=retry_after)


def classify(
    status: int, message: str, *, retry_after_s: float | None = None, http: bool = True
) -> UpstreamFailure:
    """The one status table: what an HTTP status (or its in-stream equivalent) means.

    ``http=False``: ``status`` only stands for an error sent inside a 200, so the
    failure carries no HTTP status.
    """
    shown = status if http else None
    if status == 429 or (status == 503 and retry_after_s is not None):
        # The upstream is pacing us, not failing: retry after it says, and keep
        # the circuit out of it for 429 (a 503 still says it is struggling).
        return UpstreamFailure(
            message,
            code=ErrorCode.UPSTREAM_RATE_LIMITED,
            status=shown,
            retryable=True,
            counts=status != 429,
            retry_after_s=retry_after_s,
        )
    if status in _RETRYABLE or status >= 500:
        return UpstreamFailure(message, status=shown, retryable=True, counts=True)
    if status in _FAULT_OF_CALLER or (400 <= status < 500 and status not in (401, 403)):
        return UpstreamFailure(message, status=shown, retryable=False, counts=False)
    # 401/403 (a bad key), and 1xx/2xx/3xx where a 200 belongs (a wrong base_url).
    return UpstreamFailure(message, status=shown, retryable=False, counts=True)


def error_failure(error: Any, *, what: str) -> UpstreamFailure:
    """Classify an error object sent inside a 200 (a stream's ``error`` event).

    The status comes from a numeric ``code`` (vLLM sends one) or a known error
    ``type``; an unknown error is taken for a server fault and retried.
    """
    label = error_label(error)
    status = 500
    if isinstance(error, dict):
        code = error.get("code")
        kind = error.get("type")
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            status = code
        elif isinstance(kind, str) and kind in ERROR_TYPE_STATUS:
            status = ERROR_TYPE_STATUS[kind]
        elif isinstance(code, str) and code in ERROR_TYPE_STATUS:
            status = ERROR_TYPE_STATUS[code]
    return classify(status, what + (f" ({label})" if label else ""), http=False)


def error_label(error: Any) -> str | None:
    """The upstream error's ``code`` or ``type`` when it is a short machine label."""
    if not isinstance(error, dict):
        return None
    for key in ("code", "type"):
        value = error.get(key)
        if isinstance(value, str) and _SAFE_LABEL.fullmatch(value):
            return value
    return None


def _error_object(body: bytes) -> Any:
    """The ``error`` object of an OpenAI or Anthropic error body, if it has one."""
    if not body:
        return None
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI) or ``Retry-After``
    (delta-seconds or an HTTP-date); None when absent or unparsable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        seconds = _seconds(ms)
        if seconds is not None:
            return seconds / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 dates are GMT; one without a zone is not one
    return max(0.0, when.timestamp() - time.time())


def _seconds(value: str) -> float | None:
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def transport_failure(exc: BaseException, *, in_body: bool) -> UpstreamFailure:
    """Classify a transport exception; ``in_body``: it came while reading a 200's body.

    The workers' client raises plain ones while connecting (``TimeoutError``,
    ``ssl.SSLError``, ``OSError``); httpx's are classified too, for code that
    still calls through httpx, without importing httpx into every shard (an
    httpx exception means httpx is loaded already). The exception's own text
    is never used: it may quote a header (an invalid header value is the key)
    or the URL.
    """
    logger.debug("upstream call failed: %s (in_body=%s)", type(exc).__name__, in_body)
    httpx_module = sys.modules.get("httpx")
    if httpx_module is not None and isinstance(exc, httpx_module.HTTPError):
        return _httpx_failure(exc, in_body=in_body)
    if isinstance(exc, TimeoutError):
        return _timed_out("connect")
    if isinstance(exc, ssl.SSLCertVerificationError):
        # The certificate will not verify any better next time: a config problem.
        return UpstreamFailure(
            "upstream TLS certificate could not be verified", retryable=False, counts=True
        )
    if isinstance(exc, ssl.SSLError):
        return UpstreamFailure("upstream TLS handshake failed", retryable=True, counts=True)
    if isinstance(exc, OSError):
        return broken_failure(in_body=in_body) if in_body else _connect_failed()
    return UpstreamFailure("upstream call failed", retryable=True, counts=True)


def _connect_failed() -> UpstreamFailure:
    return UpstreamFailure("upstream connection failed", retryable=True, counts=True)


def _timed_out(phase: str) -> UpstreamFailure:
    return UpstreamFailure(
        f"upstream {phase} timed out", code=ErrorCode.UPSTREAM_TIMEOUT, retryable=True, counts=True
    )


def read_timeout_failure() -> UpstreamFailure:
    """No byte came for longer than the client's read timeout (the backstop
    behind the shard's phase timeouts)."""
    return _timed_out("read")


def broken_failure(*, in_body: bool, protocol: bool = False) -> UpstreamFailure:
    """The connection ended, or the server broke HTTP/1.1 (``protocol``), during a call."""
    if in_body:
        return protocol_failure("upstream response was truncated")
    if protocol:
        return UpstreamFailure("upstream broke the HTTP protocol", retryable=True, counts=True)
    return UpstreamFailure("upstream connection broke", retryable=True, counts=True)


def _httpx_failure(exc: httpx.HTTPError, *, in_body: bool) -> UpstreamFailure:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connect",
            httpx.ReadTimeout: "read",
            httpx.WriteTimeout: "write",
            httpx.PoolTimeout: "connection pool",
        }.get(type(exc), "call")
        # A pool timeout is our own limit, not the upstream's health.
        counts = not isinstance(exc, httpx.PoolTimeout)
        return UpstreamFailure(
            f"upstream {phase} timed out",
            code=ErrorCode.UPSTREAM_TIMEOUT,
            retryable=True,
            counts=counts,
        )
    if isinstance(exc, httpx.LocalProtocolError | httpx.UnsupportedProtocol):
        return UpstreamFailure("upstream request could not be sent", retryable=False, counts=False)
    if in_body and isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError):
        return protocol_failure("upstream response was truncated")
    if isinstance(exc, httpx.ConnectError):
        return _connect_failed()
    if isinstance(exc, httpx.RemoteProtocolError):
        return broken_failure(in_body=False, protocol=True)
    if isinstance(exc, httpx.DecodingError):
        return UpstreamFailure("upstream sent an undecodable body", retryable=True, counts=True)
    if isinstance(exc, httpx.NetworkError):
        return broken_failure(in_body=False)
    return UpstreamFailure("upstream call failed", retryable=True, counts=True)


def protocol_failure(message: str) -> UpstreamFailure:
    """A 200 whose body is not what the API promises (bad JSON or SSE, cut short)."""
    return UpstreamFailure(message, retryable=True, counts=True)


def invalid_request(message: str) -> UpstreamFailure:
    """A request the worker cannot send as it is: the caller's error (400), not the
    upstream's, so it is neither retried nor counted against the circuit."""
    return UpstreamFailure(message, code=ErrorCode.INVALID_REQUEST, retryable=False, counts=False)

"""A request's own deadline, from its headers: ``X-Request-Timeout`` and the openai SDK's.

Every route takes ``X-Request-Timeout: <seconds>`` (the WebSocket on its
handshake, for each request of the connection), so a client that knows its
answer is slow, or must be quick, says so without a body field; the native
body's ``deadline_ms`` still wins where there is one. A request that names
none gets the gateway's default: ``gateway.timeout_s`` (600 s, the openai
SDK's own), ``gateway.stream_timeout_s`` for a stream (an hour, bounded
within by the upstream's between-token timeout). Never a fixed 30 s: a long
or reasoning generation once failed with 504 halfway through its stream.

The official openai SDK sends its own timeout on every call
(``x-stainless-read-timeout``; older releases ``x-stainless-timeout``). For a
call that is not a stream it is how long the client will wait for the whole
answer, so work past it is wasted and it becomes the deadline. For a stream
it bounds each read, not the whole (keep-alives and tokens reset it), so it
is not taken there. A value out of range is clamped, since the client did
not choose the header; an ``X-Request-Timeout`` out of range is refused
(400), like a ``deadline_ms`` out of range.
"""

from __future__ import annotations

import math

from mpipeline.gateway.exchange import Request
from mpipeline.gateway.schemas import Problem
from mpipeline.pipeline import limits

__all__ = ["HEADER", "SDK_HEADERS", "requested_ms"]

HEADER = "x-request-timeout"
# The openai SDK's: the current name first, then the one releases before 1.60 sent.
SDK_HEADERS = ("x-stainless-read-timeout", "x-stainless-timeout")
MAX_S = limits.MAX_DEADLINE_MS / 1000
# Header values are short numbers; anything longer is not one.
_MAX_CHARS = 32


def requested_ms(request: Request, *, stream: bool) -> float | Problem | None:
    """The deadline (ms) ``request``'s headers ask for; None: the gateway's default.

    A ``Problem`` (400, ``param`` the header) when ``X-Request-Timeout`` is not
    a number of seconds above 0 and at most the longest deadline.
    """
    value = request.header(HEADER)
    if value is not None:
        seconds = _seconds(value)
        if seconds is None or not 0 < seconds <= MAX_S:
            message = f"X-Request-Timeout must be a number of seconds above 0 and at most {MAX_S:g}"
            return Problem(message, "X-Request-Timeout")
        return seconds * 1000
    if stream:
        return None
    for name in SDK_HEADERS:
        value = request.header(name)
        if value is not None:
            seconds = _seconds(value)
            if seconds is not None and seconds > 0:
                return min(seconds, MAX_S) * 1000
    return None


def _seconds(value: str) -> float | None:
    if len(value) > _MAX_CHARS:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None

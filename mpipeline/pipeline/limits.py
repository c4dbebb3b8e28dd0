"""The bounds of every value a client can send, once for every way in.

An unbounded integer once reached the ring's encoder and wedged a gateway
replica for good (issue 15), and a map of 60,000 keys was held to its
deadline. The gateway's schemas are built from these numbers, so an HTTP
client gets a 400 naming the field; a Python caller gets a ``RequestFailed``
(``invalid_request``) from ``problem``. Strings are bounded by the gateway's
``max_body_bytes`` and, once encoded, by the first ring's record size (413).
"""

from __future__ import annotations

from mpipeline.config import MAX_DEADLINE_S
from mpipeline.errors import ErrorCode
from mpipeline.pipeline._options import RequestOptions

# The largest max_tokens: a 32-bit int, which every model server takes
# (clients that mean "no limit" send it); more is a mistake, and past 2^63
# it cannot even be encoded.
MAX_TOKENS = 2**31 - 1
# A session id is a routing key and a label, not data.
MAX_SESSION_ID = 256
# OpenAI's own limits on ``metadata``: 16 pairs, keys of 64 characters, values of 512.
MAX_METADATA_ITEMS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
# Earlier turns of a conversation.
MAX_HISTORY = 4096
# The longest deadline: an hour (config.MAX_DEADLINE_S, which bounds the
# gateway's defaults too). Longer is almost always a unit mistake (seconds sent
# as ms) and would pin a slot.
MAX_DEADLINE_MS = MAX_DEADLINE_S * 1000


def problem(options: RequestOptions) -> tuple[str, str] | None:
    """The first option out of bounds, as (field, what is wrong), or None.

    For callers that did not go through a schema (the Python API); the
    gateway's schemas enforce the same limits while they decode.
    """
    if options.max_tokens is not None and not 1 <= options.max_tokens <= MAX_TOKENS:
        return "max_tokens", f"must be between 1 and {MAX_TOKENS}"
    if options.deadline_ms is not None and not 0 < options.deadline_ms <= MAX_DEADLINE_MS:
        return "deadline_ms", f"must be above 0 and at most {MAX_DEADLINE_MS} ms"
    session = options.session_id
    if session is not None and not 1 <= len(session) <= MAX_SESSION_ID:
        return "session_id", f"must be 1 to {MAX_SESSION_ID} characters"
    if options.history is not None and len(options.history) > MAX_HISTORY:
        return "history", f"holds more than {MAX_HISTORY} turns"
    # Sent upstream as they are: a cheap check of the shape, the upstream judges the rest.
    for field, raw in (("params", options.params), ("input_raw", options.input_raw)):
        if raw and not _json_object(raw):
            return field, "must be a JSON object (bytes)"
    return _metadata_problem(options.metadata)


def _json_object(raw: bytes) -> bool:
    return isinstance(raw, bytes) and raw[:1] == b"{" and raw.rstrip()[-1:] == b"}"


def _metadata_problem(metadata: dict[str, str] | None) -> tuple[str, str] | None:
    if not metadata:
        return None
    if len(metadata) > MAX_METADATA_ITEMS:
        return "metadata", f"holds more than {MAX_METADATA_ITEMS} pairs"
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return "metadata", "keys and values must be strings"
        if len(key) > MAX_METADATA_KEY:
            return "metadata", f"key longer than {MAX_METADATA_KEY} characters"
        if len(value) > MAX_METADATA_VALUE:
            return f"metadata.{key}", f"value longer than {MAX_METADATA_VALUE} characters"
    return None


def refusal(text: str, options: RequestOptions, max_bytes: int) -> tuple[ErrorCode, str] | None:
    """Why a request must be refused before any work, as (code, reason), or None.

    ``max_bytes`` is what a record of the first ring leaves for the text,
    the history, the metadata and the raw OpenAI parts (``params``, a
    message's own JSON); the rest of the request fits in the margin.
    """
    bad = problem(options)
    if bad is not None:
        field, why = bad
        return ErrorCode.INVALID_REQUEST, f"{field}: {why}"
    turns = options.history or ()
    size = len(text) + sum(len(t.content) + len(t.raw) + 16 for t in turns)
    if options.metadata:
        size += sum(len(k) + len(v) + 8 for k, v in options.metadata.items())
    size += len(options.params or b"") + len(options.input_raw or b"")
    # Four bytes per character bound the UTF-8 size: encode only near the limit.
    if size * 4 > max_bytes and _utf8_size(text, options) > max_bytes:
        return ErrorCode.TOO_LARGE, f"input of {size} characters exceeds the limit of {max_bytes}"
    return None


def _utf8_size(text: str, options: RequestOptions) -> int:
    """Bytes of a request's text on the wire (16 bytes of framing per turn or pair)."""
    size = len(text.encode()) + len(options.params or b"") + len(options.input_raw or b"")
    turns = options.history or ()
    size += sum(len(t.content.encode()) + len(t.raw) + len(t.role) + 16 for t in turns)
    meta = options.metadata or {}
    return size + sum(len(k.encode()) + len(v.encode()) + 16 for k, v in meta.items())

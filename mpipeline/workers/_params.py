"""The request fields a worker reads out of ``PromptRequest.params`` itself.

``params`` is the client's chat-completion request less its messages, as
JSON in OpenAI's names. The ``openai`` worker sends it on untouched, so it
never decodes it beyond the few keys it must merge; the other workers honour
(or translate) a handful of fields, read here into one small Struct. The
gateway has already refused what the configured worker cannot honour
(``fields.py``), and validated every value, so decoding here only fails for a
Python caller that built ``params`` by hand: that is its request's error
(``invalid_request``), never the upstream's.

A request with no ``params`` (the usual case) costs an attribute test.
"""

from __future__ import annotations

import msgspec

from mpipeline.messages import PromptRequest
from mpipeline.workers._failures import invalid_request

__all__ = [
    "NO_SAMPLING",
    "JsonSchema",
    "ResponseFormat",
    "Sampling",
    "json_mode",
    "response_format",
    "sampling",
]


class _ResponseFormat(msgspec.Struct, frozen=True):
    type: str = "text"


class JsonSchema(msgspec.Struct, frozen=True):
    """``response_format.json_schema``: the schema stays raw JSON (the backend judges it)."""

    name: str = "json"
    description: str | None = None
    schema: msgspec.Raw = msgspec.Raw()
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, frozen=True):
    """A ``response_format`` that asks for JSON: ``json_object``, or ``json_schema``
    with its schema (``json_schema.schema`` is b"" when none was given)."""

    type: str = "text"
    json_schema: JsonSchema | None = None


class _FullFormat(msgspec.Struct, frozen=True):
    response_format: ResponseFormat | None = None


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """What the local and translating workers honour; None: the worker's default."""

    temperature: float | None = None
    top_p: float | None = None
    # Anthropic's (OpenAI has none); a request from /v1/messages carries it.
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None

    @property
    def stops(self) -> list[str]:
        """The stop sequences as a list (OpenAI takes one string or up to four)."""
        stop = self.stop
        if stop is None:
            return []
        return [stop] if isinstance(stop, str) else [s for s in stop if s]


class _Format(msgspec.Struct, frozen=True):
    response_format: _ResponseFormat | None = None


NO_SAMPLING = Sampling()
_SAMPLING = msgspec.json.Decoder(Sampling)
_FORMAT = msgspec.json.Decoder(_Format)
_FULL_FORMAT = msgspec.json.Decoder(_FullFormat)
# The response formats whose output is a JSON document that no text rule may touch.
_JSON_FORMATS = frozenset({"json_object", "json_schema"})


def sampling(request: PromptRequest) -> Sampling:
    """The sampling fields of ``request`` (``NO_SAMPLING`` when it has no params).

    :raises UpstreamFailure: ``invalid_request`` when ``params`` holds a field of
        the wrong type (only a Python caller can send that; the gateway checks)
    """
    params = request.params
    if not params:
        return NO_SAMPLING
    try:
        return _SAMPLING.decode(params)
    except msgspec.DecodeError as exc:
        raise invalid_request(f"params: {exc}") from None


def json_mode(params: bytes) -> bool:
    """Whether the request asked for JSON output (``response_format`` json_object or
    json_schema): then post leaves the text as the model wrote it."""
    if not params or b'"response_format"' not in params:
        return False
    try:
        fmt = _FORMAT.decode(params).response_format
    except msgspec.DecodeError:
        return False
    return fmt is not None and fmt.type in _JSON_FORMATS


def response_format(params: bytes) -> ResponseFormat | None:
    """The ``response_format`` of a request that asked for JSON, else None.

    :raises UpstreamFailure: ``invalid_request`` when it is malformed (only a
        Python caller can send that; the gateway checks)
    """
    if not params or b'"response_format"' not in params:
        return None
    try:
        fmt = _FULL_FORMAT.decode(params).response_format
    except msgspec.DecodeError as exc:
        raise invalid_request(f"params: {exc}") from None
    if fmt is None or fmt.type not in _JSON_FORMATS:
        return None
    return fmt

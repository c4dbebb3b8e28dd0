"""Session affinity: the single definition of which replica a message goes to.

Every producer and the client that tracks in-flight requests call the same
functions, so "which shard holds this session" has one answer everywhere:
the client uses it to know which requests a crashed replica stranded.
"""

from __future__ import annotations

import xxhash

from mpipeline.messages import (
    Assembled,
    Failed,
    Message,
    PromptRequest,
    Reply,
    Retrieved,
)


def shard_for(key: str, n: int) -> int:
    """Replica index in ``range(n)`` for ``key``; stable across processes and runs.

    xxh3 rather than ``hash()``: str hashing is salted per process.
    """
    if n == 1:
        return 0
    return xxhash.xxh3_64_intdigest(key.encode()) % n


def dedup_key(request: PromptRequest) -> str:
    """Identity of the work a request asks for, independent of who asked.

    Built from the request alone (not the assembled prompt) so that the
    client can compute the inference shard without running assemble. Every
    part that can change the answer is in it: the conversation so far (the
    same words after a different history are a different request), each
    message's own JSON (an image, a tool call), the request's other fields
    (``params``: temperature, tools, response_format...) and the model. JSON
    and model names hold no NUL byte, so the separators keep the parts apart.
    """
    head = f"{request.max_tokens}\0{request.model}\0{request.endpoint}\0"
    if not request.history and not request.params and not request.input_raw:
        return xxhash.xxh3_128_hexdigest(f"{head}{request.input}".encode())
    h = xxhash.xxh3_128(head.encode())
    h.update(request.params)
    h.update(b"\0")
    for turn in request.history:
        h.update(f"{turn.role}\0{turn.content}\0".encode())
        if turn.raw:
            h.update(turn.raw)
            h.update(b"\0")
    h.update(request.input.encode())
    if request.input_raw:
        h.update(b"\0")
        h.update(request.input_raw)
    return h.hexdigest()


def request_key(request: PromptRequest, stage: str) -> str:
    """Routing key of a request on its way into ``stage``.

    A session always routes by its id (affinity). Without one, inference
    routes by dedup key so identical prompts meet on one shard for
    coalescing; other stages spread by request id.
    """
    if request.session_id:
        return request.session_id
    if stage == "inference":
        return dedup_key(request)
    return request.request_id


def message_key(msg: Message) -> str:
    """Routing key of any pipeline message; all of one request share it after inference."""
    if isinstance(msg, Assembled):
        return msg.request.session_id or msg.dedup_key
    if isinstance(msg, Retrieved):
        return msg.request.session_id or msg.request.request_id
    if isinstance(msg, PromptRequest):
        return msg.session_id or msg.request_id
    if isinstance(msg, Reply):
        return msg.session_id or msg.request_id
    raise TypeError(f"cannot route {type(msg).__name__}")


__all__ = ["Failed", "dedup_key", "message_key", "request_key", "shard_for"]

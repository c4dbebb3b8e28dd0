"""The bytes the fault upstream sends: HTTP/1.1 framing and both APIs' bodies.

Kept apart from ``fault_upstream.py`` (which decides *what* to send for each
scripted behaviour) so that the happy-path wire format of each API reads in
one place, event for event as the providers document it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import msgspec

# Part of what a real 401 says back: the upstream's free text quotes the key, so
# tests can check that no worker passes that text on.
KEY_ECHO_CHARS = 8
TOKEN = re.compile(r"\s*\S+\s*")
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    529: "Overloaded",
}
STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
ERROR_STATUS = {v: k for k, v in STATUS_TYPES.items()} | {"api_error": 500}


@dataclass
class Exchange:
    """What one request needs to render a response in either API."""

    api: str  # "openai" or "anthropic"
    stream: bool
    body: Any
    headers: dict[str, str]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    model: str = "fault-model"
    include_usage: bool = False


async def send(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    extra: tuple[tuple[str, str], ...] = (),
    ctype: str = "application/json",
) -> None:
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    head += [f"content-type: {ctype}", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in extra]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
    await writer.drain()


async def start_stream(writer: asyncio.StreamWriter) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n\r\n"
    )
    await writer.drain()


async def chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
    await writer.drain()


async def end_chunked(writer: asyncio.StreamWriter) -> None:
    writer.write(b"0\r\n\r\n")
    await writer.drain()


def words(body: dict[str, Any]) -> list[str]:
    """The last user message, as word tokens (text parts of content lists too)."""
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return TOKEN.findall(str(content))
    return []


def prompt_tokens(body: dict[str, Any]) -> int:
    text = " ".join(
        str(m.get("content", "")) for m in body.get("messages") or [] if isinstance(m, dict)
    )
    return len(text.split()) + (len(str(body.get("system", "")).split()))


def error_body(reply: Exchange, status: int) -> bytes:
    kind = STATUS_TYPES.get(status, "api_error")
    if reply.api == "anthropic":
        return anthropic_error(kind)
    # Like OpenAI's, the free text quotes part of the key it was given.
    key = reply.headers.get("authorization", "").removeprefix("Bearer ")
    message = f"Incorrect API key provided: {key[:KEY_ECHO_CHARS]}***. Status {status}."
    code = "invalid_api_key" if status == 401 else None
    return msgspec.json.encode({"error": {"message": message, "type": kind, "code": code}})


def anthropic_error(kind: str) -> bytes:
    return msgspec.json.encode(
        {"type": "error", "error": {"type": kind, "message": f"{kind}: Something went wrong"}}
    )


class Render:
    """The bytes of one reply in the request's API: ``tokens`` as the content,
    usage reported or not, ``cached`` prompt tokens as cache hits."""

    def __init__(
        self, reply: Exchange, tokens: list[str], *, finish: str, usage: bool, cached: int
    ) -> None:
        self.reply = reply
        self.tokens = tokens
        self.finish = finish
        self.usage = usage
        self.cached = cached
        self.prompt = prompt_tokens(reply.body)

    def _openai(self, obj: dict[str, Any]) -> bytes:
        base = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "model": "m"}
        return b"data: " + msgspec.json.encode(base | obj) + b"\n\n"

    def _anthropic(self, event: str, obj: dict[str, Any]) -> bytes:
        data = msgspec.json.encode({"type": event} | obj)
        return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"

    def _usage(self) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt,
            "completion_tokens": len(self.tokens),
            "total_tokens": self.prompt + len(self.tokens),
        }
        if self.cached:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return usage

    def opening(self) -> bytes:
        if self.reply.api == "openai":
            choice = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            return self._openai({"choices": [choice | {"finish_reason": None}]})
        usage = {
            "input_tokens": self.prompt - self.cached,
            "output_tokens": 1,
            "cache_read_input_tokens": self.cached,
        }
        message: dict[str, Any] = {
            "id": "msg_fault",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.reply.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        block = {"index": 0, "content_block": {"type": "text", "text": ""}}
        return (
            self._anthropic("message_start", {"message": message})
            + self._anthropic("content_block_start", block)
            + self._anthropic("ping", {})
        )

    def token(self, text: str) -> bytes:
        if self.reply.api == "openai":
            delta = {"index": 0, "delta": {"content": text}, "finish_reason": None}
            return self._openai({"choices": [delta]})
        delta = {"type": "text_delta", "text": text}
        return self._anthropic("content_block_delta", {"index": 0, "delta": delta})

    def closing(self) -> bytes:
        if self.reply.api == "openai":
            end = {"index": 0, "delta": {}, "finish_reason": self.finish}
            out = self._openai({"choices": [end]})
            if self.reply.include_usage and self.usage:
                out += self._openai({"choices": [], "usage": self._usage()})
            return out + b"data: [DONE]\n\n"
        reason = {"stop": "end_turn", "length": "max_tokens"}.get(self.finish, self.finish)
        delta = {"stop_reason": reason, "stop_sequence": None}
        return (
            self._anthropic("content_block_stop", {"index": 0})
            + self._anthropic(
                "message_delta", {"delta": delta, "usage": {"output_tokens": len(self.tokens)}}
            )
            + self._anthropic("message_stop", {})
        )

    def whole(self) -> bytes:
        text = "".join(self.tokens)
        if self.reply.api == "openai":
            message = {"role": "assistant", "content": text}
            doc: dict[str, Any] = {
                "id": "chatcmpl-fault",
                "object": "chat.completion",
                "model": self.reply.model,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish}],
            }
            if self.usage:
                doc["usage"] = self._usage()
            return msgspec.json.encode(doc)
        reason = {"stop": "end_turn", "length": "max_tokens"}.get(self.finish, self.finish)
        return msgspec.json.encode(
            {
                "id": "msg_fault",
                "type": "message",
                "role": "assistant",
                "model": self.reply.model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": reason,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": self.prompt - self.cached,
                    "output_tokens": len(self.tokens),
                    "cache_read_input_tokens": self.cached,
                },
            }
        )

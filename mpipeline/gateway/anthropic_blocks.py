"""A reply's content blocks in Anthropic's shape: text, and ``tool_use`` from OpenAI's tool calls.

A reply with tool calls reaches the gateway in OpenAI's shape, whatever the
worker (``Completed.raw`` a whole completion with ``tool_calls``, each
streamed piece a ``StructuredChunk`` whose ``raw`` is an OpenAI chunk with a
tool-call delta: passed on by an OpenAI-compatible upstream, built from
Anthropic's blocks by the anthropic worker). ``/v1/messages`` answers with
Anthropic's blocks: the text block first (if there is text), then one
``tool_use`` block per call, its ``input`` the arguments parsed (arguments
that are not JSON, a model's slip, are given as their text rather than lost).

Streamed, Anthropic's blocks come one at a time (start, deltas, stop), each
with its index, and the SDK builds its message by those indexes. OpenAI's
calls stream one after another too, but may interleave (a fragment of call
0 after call 1 began): a call that begins while the open one's arguments are
not yet a whole JSON document is held back, and sent whole after the live
one, at the end; text that comes after a call began is sent as a last text
block. So the indexes always count up, each block is closed before the next
opens, and nothing is lost.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mpipeline.gateway import sse
from mpipeline.gateway.anthropic_shapes import TextOut, ToolUseOut

__all__ = ["BlockStream", "content", "event"]

_ENCODE = msgspec.json.Encoder().encode


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _Call(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Function | None = None


class _Message(msgspec.Struct):
    tool_calls: list[_Call] | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct):
    message: _Message | None = None
    delta: _Message | None = None


class _Doc(msgspec.Struct):
    choices: list[_Choice] | None = None


_DOC = msgspec.json.Decoder(_Doc)


def _first(raw: bytes) -> _Choice | None:
    try:
        choices = _DOC.decode(raw).choices
    except msgspec.DecodeError:
        return None
    return choices[0] if choices else None


def _input(arguments: str) -> Any:
    try:
        return msgspec.json.decode(arguments or "{}")
    except msgspec.DecodeError:
        return arguments


def content(text: str, raw: bytes) -> list[TextOut | ToolUseOut]:
    """A whole reply's blocks: its text (post's, ``Completed.text``), then its tool calls
    from the completion JSON ``raw`` (b"": none)."""
    choice = _first(raw) if raw else None
    message = choice.message if choice is not None else None
    calls = (message.tool_calls if message is not None else None) or []
    if message is not None and message.refusal and not text:
        text = message.refusal
    blocks: list[TextOut | ToolUseOut] = [TextOut(text=text)] if text or not calls else []
    for call in calls:
        fn = call.function or _Function()
        blocks.append(
            ToolUseOut(id=call.id or "", name=fn.name or "", input=_input(fn.arguments or ""))
        )
    return blocks


def event(name: str, body: dict[str, Any]) -> bytes:
    """One Anthropic stream event (its name also its ``type``)."""
    return sse.event(_ENCODE({"type": name, **body}), name)


class _Live:
    """A tool call of the stream: its id, name, arguments so far, and its block (None
    while held back)."""

    __slots__ = ("arguments", "block", "id", "name")

    def __init__(self, call_id: str, name: str) -> None:
        self.id = call_id
        self.name = name
        self.arguments = ""
        self.block: int | None = None


class BlockStream:
    """The stream's content blocks: ``content_block_start``, deltas and ``_stop`` events,
    indexes counted up, one block open at a time (the first start followed by ``ping``)."""

    def __init__(self) -> None:
        self._count = 0
        self._open: int | None = None  # the open block's index
        self._open_call: int | None = None  # the open block's call (None: text)
        self._calls: dict[int, _Live] = {}
        self._held: list[int] = []
        self._late: list[str] = []
        self.tool_calls = False

    def text(self, text: str) -> bytes:
        if not text:
            return b""
        if self._calls:  # a call began: text goes after the calls
            self._late.append(text)
            return b""
        out = b"" if self._open is not None else self._start({"type": "text", "text": ""})
        delta = {"type": "text_delta", "text": text}
        return out + event("content_block_delta", {"index": self._open, "delta": delta})

    def structured(self, text: str, raw: bytes) -> bytes:
        """A ``StructuredChunk``: its text, and the tool-call deltas in its OpenAI chunk."""
        choice = _first(raw)
        delta = choice.delta if choice is not None else None
        if delta is not None and delta.refusal:
            text += delta.refusal
        out = self.text(text)
        for call in (delta.tool_calls if delta is not None else None) or ():
            out += self._call(call)
        return out

    def _call(self, call: _Call) -> bytes:
        fn = call.function or _Function()
        live = self._calls.get(call.index)
        out = b""
        if live is None:
            live = self._calls[call.index] = _Live(call.id or "", fn.name or "")
            self.tool_calls = True
            open_call = self._calls.get(self._open_call) if self._open_call is not None else None
            if self._held or (open_call is not None and not _whole(open_call.arguments)):
                self._held.append(call.index)
            else:
                out = self._close() + self._start_call(call.index)
        if fn.arguments:
            live.arguments += fn.arguments
            if live.block is not None:
                out += self._fragment(live.block, fn.arguments)
        return out

    def finish(self) -> bytes:
        """The open block's stop, then what was held back, each whole."""
        out = self._close()
        for index in self._held:
            live = self._calls[index]
            out += self._start_call(index)
            if live.arguments:
                out += self._fragment(live.block or 0, live.arguments)
            out += self._close()
        if self._late:
            out += self._start({"type": "text", "text": ""})
            delta = {"type": "text_delta", "text": "".join(self._late)}
            out += event("content_block_delta", {"index": self._open, "delta": delta})
            out += self._close()
        if not self._count:  # a reply with no content still has its (empty) text block
            out += self._start({"type": "text", "text": ""}) + self._close()
        return out

    def _start(self, block: dict[str, Any]) -> bytes:
        index = self._open = self._count
        self._count += 1
        out = event("content_block_start", {"index": index, "content_block": block})
        return out + event("ping", {}) if index == 0 else out

    def _start_call(self, index: int) -> bytes:
        live = self._calls[index]
        block = {"type": "tool_use", "id": live.id, "name": live.name, "input": {}}
        out = self._start(block)
        live.block = self._open
        self._open_call = index
        return out

    def _fragment(self, index: int, partial: str) -> bytes:
        delta = {"type": "input_json_delta", "partial_json": partial}
        return event("content_block_delta", {"index": index, "delta": delta})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        out = event("content_block_stop", {"index": self._open})
        self._open = self._open_call = None
        return out


def _whole(arguments: str) -> bool:
    """Whether a call's arguments so far are a whole JSON document (the call is done)."""
    try:
        msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        return False
    return True

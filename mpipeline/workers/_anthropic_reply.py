"""Anthropic's reply in OpenAI's terms: ``tool_use`` blocks as ``tool_calls``.

``tool_use`` blocks become OpenAI ``tool_calls`` (the arguments as the
JSON text Anthropic sent), streamed as OpenAI does (the first delta of a call
with its index, id and name, then argument fragments as ``input_json_delta``
brings them), in OpenAI's own chunk and completion JSON (``Structured``
pieces, ``Generation.raw``), so the OpenAI route passes them on unchanged.
``stop_reason`` tool_use is ``finish_reason`` tool_calls (stop when the only
tool called was the JSON answer's).

Kept apart from the request's translation (``_anthropic_wire``): this is the
part a stream runs per event.
"""

from __future__ import annotations

from typing import Any

import msgspec

from mpipeline.workers.base import Structured

__all__ = ["ReplyTools", "stop_reason"]

# Anthropic's stop reasons in the OpenAI vocabulary the rest of mpipeline speaks.
_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_ENCODE = msgspec.json.Encoder().encode


def stop_reason(reason: str | None) -> str:
    """Anthropic's ``stop_reason`` as a ``finish_reason`` (unknown ones as they are)."""
    if reason is None:
        return "stop"
    return _STOP_REASONS.get(reason, reason)


def _chunk(call: dict[str, Any]) -> bytes:
    """An OpenAI ``chat.completion.chunk`` carrying one tool-call delta (the route
    sets its id, created and model)."""
    delta = {"tool_calls": [call]}
    choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
    return _ENCODE({"object": "chat.completion.chunk", "choices": [choice]})


class ReplyTools:
    """One reply's tool calls: which content blocks are calls (and their OpenAI
    index), which is the JSON answer, whose input is the reply's text."""

    __slots__ = ("answers", "calls", "json_tool")

    def __init__(self, json_tool: str | None) -> None:
        self.json_tool = json_tool
        self.calls: dict[int, int] = {}  # content block index -> tool call index
        self.answers: set[int] = set()

    def start(self, block: int, kind: str, call_id: str | None, name: str | None) -> str | None:
        """A ``content_block_start``: the first delta of a tool call, or None."""
        if kind != "tool_use":
            return None
        if name is not None and name == self.json_tool:
            self.answers.add(block)
            return None
        index = self.calls[block] = len(self.calls)
        fn = {"name": name, "arguments": ""}
        raw = _chunk({"index": index, "id": call_id, "type": "function", "function": fn})
        return Structured("", raw)

    def fragment(self, block: int, partial: str | None) -> str | None:
        """An ``input_json_delta``: an argument fragment, or the JSON answer's text."""
        if not partial:
            return None
        if block in self.answers:
            return partial
        index = self.calls.get(block)
        if index is None:
            return None
        return Structured("", _chunk({"index": index, "function": {"arguments": partial}}))

    def finish(self, reason: str | None) -> str:
        finish = stop_reason(reason)
        if finish == "tool_calls" and not self.calls:
            return "stop"  # the JSON answer was the only call: it is the text
        return finish

    def completion(
        self,
        blocks: list[tuple[str, str | None, str | None, str | None, bytes]],
        reason: str | None,
    ) -> tuple[str, bytes, str]:
        """A whole reply's ``(type, text, id, name, input JSON)`` blocks: its text, its
        OpenAI completion JSON (b"" when it has no tool calls) and finish reason."""
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for i, (kind, text, call_id, name, arguments) in enumerate(blocks):
            if kind == "text" and text:
                texts.append(text)
            elif kind == "tool_use":
                if name is not None and name == self.json_tool:
                    texts.append(arguments.decode())
                    continue
                self.calls[i] = len(calls)
                fn = {"name": name, "arguments": arguments.decode() or "{}"}
                calls.append({"id": call_id, "type": "function", "function": fn})
        text = "".join(texts)
        finish = self.finish(reason)
        if not calls:
            return text, b"", finish
        message = {"role": "assistant", "content": text or None, "tool_calls": calls}
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        return text, _ENCODE({"object": "chat.completion", "choices": [choice]}), finish

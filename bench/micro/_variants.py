"""Message shapes under each msgspec Struct option set, for the codec benchmarks.

``mpipeline.messages`` fixes one option set; these twins of its hot messages
(same fields, same tags) let one benchmark run compare every set on equal
terms. Keep the fields in step with ``messages.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec

# name -> Struct options; "map" is msgspec's default.
VARIANTS: dict[str, dict[str, bool]] = {
    "map": {"array_like": False, "gc": True},
    "map+nogc": {"array_like": False, "gc": False},
    "array": {"array_like": True, "gc": True},
    "array+nogc": {"array_like": True, "gc": False},
}

BATCH = 64
PROMPT_BYTES = 512


def build(array_like: bool, gc: bool) -> SimpleNamespace:
    """Define PromptRequest, TokenChunk, Completed (+ Usage) with these options."""

    def struct(name: str, fields: list[Any], tag: str | None) -> Any:
        return msgspec.defstruct(
            name,
            fields,
            frozen=True,
            kw_only=True,
            tag=tag,
            tag_field="t" if tag else None,
            array_like=array_like,
            gc=gc,
        )

    stamps: tuple[str, Any, Any] = ("stamps", dict[str, int], msgspec.field(default_factory=dict))
    reply = [("request_id", str), ("session_id", str | None), ("reply_to", int)]
    usage = struct("Usage", [("prompt_tokens", int), ("completion_tokens", int)], None)
    request = struct(
        "PromptRequest",
        [
            ("request_id", str),
            ("session_id", str | None, None),
            ("input", str),
            ("metadata", dict[str, str], msgspec.field(default_factory=dict)),
            ("priority", int, 2),
            ("deadline_ns", int, 0),
            ("reply_to", int, 0),
            ("stream", bool, False),
            ("max_tokens", int | None, None),
            stamps,
        ],
        "req",
    )
    chunk = struct("TokenChunk", [*reply, ("index", int), ("text", str)], "tok")
    completed = struct(
        "Completed",
        [*reply, ("text", str), ("usage", usage), ("finish_reason", str, "stop"), stamps],
        "done",
    )
    return SimpleNamespace(
        PromptRequest=request, TokenChunk=chunk, Completed=completed, Usage=usage
    )


def samples(ns: Any) -> dict[str, Any]:
    """One realistic instance of each hot message, built from namespace ``ns``."""
    t0 = 1_700_000_000_000_000_000
    return {
        "request": ns.PromptRequest(
            request_id="0f8fad5b-d9cb-469f-a165-70867728950e",
            session_id="sess-7c9e6679",
            input=("Summarise the following passage in two sentences. " * 11)[:PROMPT_BYTES],
            metadata={"user": "u-4711", "model": "llama-3-8b", "lang": "en"},
            deadline_ns=t0 + 30_000_000_000,
            reply_to=1,
            max_tokens=256,
            stamps={"gateway": t0, "rag": t0 + 41_000, "assemble": t0 + 97_000},
        ),
        "chunk": ns.TokenChunk(
            request_id="0f8fad5b-d9cb-469f-a165-70867728950e",
            session_id="sess-7c9e6679",
            reply_to=1,
            index=17,
            text=" token",
        ),
        "completed": ns.Completed(
            request_id="0f8fad5b-d9cb-469f-a165-70867728950e",
            session_id="sess-7c9e6679",
            reply_to=1,
            text="The passage argues that shared memory rings beat pipes. " * 5,
            usage=ns.Usage(prompt_tokens=131, completion_tokens=58),
            stamps={"gateway": t0, "rag": t0 + 41_000, "inference": t0 + 9_000_000},
        ),
    }

"""The README's table of OpenAI fields and backends says what the code does, so the
two cannot drift: each cell is checked against ``workers.fields`` (what is
translated, and to what) and against what the OpenAI route admits for that
worker (what is refused), with a value that asks for something."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mpipeline.gateway.openai_fields import Backend
from mpipeline.gateway.openai_request import ChatBody, parse
from mpipeline.gateway.schemas import Problem
from mpipeline.workers.fields import ANTHROPIC, ECHO, LLAMA_CPP, OPENAI, Capabilities

README = Path(__file__).resolve().parents[3] / "README.md"
WORKERS: dict[str, Capabilities] = {
    "openai": OPENAI,
    "anthropic": ANTHROPIC,
    "llama_cpp": LLAMA_CPP,
    "echo": ECHO,
}
KINDS = ("passed", "translated", "honoured", "refused")
USER = {"role": "user", "content": "hi"}
TOOL = {"type": "function", "function": {"name": "f"}}
# A value of each field that asks for something (never one the route lets by as a no-op).
VALUES: dict[str, Any] = {
    "max_tokens": 5,
    "max_completion_tokens": 5,
    "temperature": 0.5,
    "top_p": 0.5,
    "top_k": 5,
    "stop": "x",
    "seed": 1,
    "presence_penalty": 0.1,
    "frequency_penalty": 0.1,
    "logit_bias": {"1": 1},
    "logprobs": True,
    "top_logprobs": 2,
    "n": 1,
    "tools": [TOOL],
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "response_format": {"type": "json_object"},
    "stream_options": {"include_usage": True},
    "user": "u",
    "metadata": {"k": "v"},
}
UNKNOWN = "x_unknown_field"
MESSAGES = "messages"
STRUCTURED = [
    USER,
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c", **TOOL | {"function": {
        "name": "f", "arguments": "{}"}}}]},
    {"role": "tool", "tool_call_id": "c", "content": "r"},
]  # fmt: skip


def _table() -> tuple[list[str], dict[str, list[str]]]:
    """The section's table: its worker columns, and each row's cells by field."""
    text = README.read_text()
    section = text.split("### OpenAI fields and backends\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows: dict[str, list[str]] = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name = cells[0]
        if name.startswith(MESSAGES):
            key = MESSAGES
        elif name == "any other field":
            key = UNKNOWN
        else:
            found = re.fullmatch(r"`(\w+)`( \(.*\))?", name)
            assert found, f"a row names one field in backticks: {name!r}"
            key = found.group(1)
        assert key not in rows, f"two rows for {key}"
        rows[key] = cells[1:]
    return header[1:], rows


COLUMNS, ROWS = _table()


def test_the_table_has_a_column_per_worker_and_a_row_per_field() -> None:
    assert COLUMNS == list(WORKERS)
    own = {"model", "messages", "stream"}
    checked = {f.name for f in msgspec.structs.fields(ChatBody)} - own
    named = set(checked)
    for caps in WORKERS.values():
        named |= set(caps.fields or ()) | set(caps.translated)
    assert set(ROWS) == named | {MESSAGES, UNKNOWN}
    assert checked <= set(VALUES)


def _admitted(worker: str, key: str) -> bool:
    if key == MESSAGES:
        body: dict[str, Any] = {"model": "m", "messages": STRUCTURED}
    else:
        value = VALUES.get(key, 1)
        body = {"model": "m", "messages": [USER], key: value}
    parsed = parse(msgspec.json.encode(body))
    assert not isinstance(parsed, Problem), parsed
    return Backend.for_worker(worker).admit(parsed) is None


@pytest.mark.parametrize("key", list(ROWS))
def test_each_cell_says_what_the_worker_does(key: str) -> None:
    for worker, cell in zip(COLUMNS, ROWS[key], strict=True):
        caps = WORKERS[worker]
        kind = cell.split(" ", 1)[0].rstrip(":")
        assert kind in KINDS, (key, worker, cell)
        assert (kind == "refused") == (not _admitted(worker, key)), (key, worker, cell)
        if kind == "refused":
            continue
        if worker == "openai":
            assert kind == "passed", (key, cell)
        elif key == MESSAGES:
            assert caps.messages and kind == "translated", (key, worker, cell)
        elif key in caps.translated:
            assert kind == "translated" and caps.translated[key] in cell, (key, worker, cell)
        else:
            assert kind in ("passed", "honoured"), (key, worker, cell)

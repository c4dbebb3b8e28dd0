"""Why a request body is not JSON, in mpipeline's words, with the byte offset.

msgspec finds bad JSON in the same pass that decodes good JSON, but its
wording is not ours to promise: 0.23 changed "invalid UTF-8 (byte 11)" into a
bare "Invalid UTF-8 encoded string" and clients lost the offset. So once
msgspec has refused a body, this module looks at it again (only on that error
path, never for a good body) and says what is wrong and at which byte, with
the stdlib's decoder as the locator: its positions and error kinds have not
changed in a decade, and we map them to our own sentences.
"""

from __future__ import annotations

import json
import re

__all__ = ["describe"]

# An escaped high surrogate not followed by an escaped low one, or a low one
# not preceded by a high one: JSON text that names no Unicode character.
_LONE_SURROGATE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)
# Our sentence for each kind of fault the stdlib's decoder reports (its
# message up to the colon), checked in order.
_KINDS = (
    ("Extra data", "unexpected data after the JSON value"),
    ("Unterminated string", "a string is never closed"),
    ("Invalid control character", "a control character inside a string must be escaped"),
    ("Invalid \\uXXXX escape", "an invalid \\u escape in a string"),
    ("Invalid \\escape", "an invalid escape in a string"),
    ("Expecting property name", "expected a field name in double quotes"),
    ("Expecting ':' delimiter", "expected ':' after a field name"),
    ("Expecting ',' delimiter", "expected ',' or the end of the object or array"),
)


def describe(body: bytes) -> str:
    """Say why ``body`` is not a JSON document: what, and the byte where it is.

    ``body`` is one that a JSON decoder has refused; a body that is valid
    after all gets a generic sentence rather than an exception.
    """
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        return f"the body is not valid UTF-8 (byte {exc.start})"
    # NaN and Infinity: the stdlib reads them, JSON (and msgspec) does not.
    constants: list[str] = []
    try:
        json.loads(text, parse_constant=constants.append)
    except json.JSONDecodeError as exc:
        pos, why = _locate(text, exc)
        return f"invalid JSON at byte {_byte(text, pos)}: {why}"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    if constants:
        return f"invalid JSON: {constants[0]} is not a JSON number"
    lone = _LONE_SURROGATE.search(text)
    if lone is not None:
        where = _byte(text, lone.start())
        return f"invalid JSON at byte {where}: {lone[0]} is an unpaired surrogate, not a character"
    return "invalid JSON"


def _byte(text: str, pos: int) -> int:
    """The byte offset of character ``pos`` in the UTF-8 body."""
    return len(text[:pos].encode())


def _locate(text: str, exc: json.JSONDecodeError) -> tuple[int, str]:
    """Where the fault is (a character index) and our sentence for it."""
    pos = exc.pos
    comma = _trailing_comma(text, pos)
    if comma is not None:
        return comma, "a trailing comma"
    if exc.msg.startswith("Invalid \\uXXXX") and text[pos - 1 : pos] == "\\":
        pos -= 1  # point at the backslash, as for every other bad escape
    for kind, sentence in _KINDS:
        if exc.msg.startswith(kind):
            return pos, sentence
    if pos >= len(text.rstrip()):
        return pos, "the body ends before the JSON value is complete"
    return pos, f"unexpected character {text[pos]!r}"


def _trailing_comma(text: str, pos: int) -> int | None:
    """The comma's index when the fault at ``pos`` is a comma before ``}`` or ``]``.

    Python 3.11 reports it at the bracket, 3.13 at the comma: both are found.
    """
    if text[pos : pos + 1] == ",":
        after = text[pos + 1 :].lstrip()
        return pos if after[:1] in ("}", "]") and after else None
    if text[pos : pos + 1] in ("}", "]"):
        before = text[:pos].rstrip()
        return len(before) - 1 if before.endswith(",") else None
    return None

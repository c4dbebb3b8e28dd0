"""Schema-independent TOML plumbing for ``config.py``: decode, locate, write.

``tomllib`` returns plain dicts with no positions, and msgspec stops at the first
error, so error messages that name a line need this small structural scanner. It
runs only on text that ``tomllib`` has already accepted, so it can skip values
without judging them; on anything it does not understand it stops and returns
what it found, since a missing line number is better than a crash.

Decoding goes key by key for the same reason: msgspec reports one error per
call, and a config check should report them all.

Writing exists because ``msgspec.toml.encode`` needs ``tomli_w``, which is not a
dependency; the config tree holds only tables, scalars and lists of scalars.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

import msgspec

_S = TypeVar("_S", bound=msgspec.Struct)
# A problem found while decoding: (dotted field path, message).
Problem = tuple[str, str]

# How tomllib ends its error messages.
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
# How msgspec says a Struct was built without a required field.
_MISSING = re.compile(r"Missing required argument '([^']+)'")
# Characters of a bare key (TOML 1.0).
_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class _Scanner:
    """Walks TOML text recording where each key starts; raises ValueError when lost."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.found: dict[str, int] = {}
        # Arrays of tables met so far, by path: how many members each has.
        self.arrays: dict[tuple[str, ...], int] = {}

    @property
    def line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def skip_blank(self, newlines: bool) -> None:
        """Skip spaces and comments, and line breaks too when ``newlines``."""
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif c in " \t\r" or (newlines and c == "\n"):
                self.pos += 1
            else:
                return

    def expect(self, c: str) -> None:
        self.skip_blank(newlines=False)
        if self.peek() != c:
            raise ValueError(self.pos)
        self.pos += 1

    def key(self) -> list[str]:
        parts = []
        while True:
            self.skip_blank(newlines=False)
            c = self.peek()
            if c in ('"', "'"):
                parts.append(self.string())
            else:
                start = self.pos
                while self.peek() and self.peek() in _BARE:
                    self.pos += 1
                if self.pos == start:
                    raise ValueError(self.pos)
                parts.append(self.text[start : self.pos])
            self.skip_blank(newlines=False)
            if self.peek() != ".":
                return parts
            self.pos += 1

    def string(self) -> str:
        """Consume a string of any of the four kinds; return its raw contents."""
        quote = self.peek()
        delim = quote * 3 if self.peek(3) == quote * 3 else quote
        self.pos += len(delim)
        start = self.pos
        while self.pos < len(self.text):
            if quote == '"' and self.peek() == "\\":
                self.pos += 2
            elif self.text.startswith(delim, self.pos):
                # A multi-line string may end with up to two extra quotes.
                while len(delim) == 3 and self.text.startswith(delim + quote, self.pos):
                    self.pos += 1
                raw = self.text[start : self.pos]
                self.pos += len(delim)
                return raw
            else:
                self.pos += 1
        raise ValueError(self.pos)

    def value(self, path: list[str]) -> None:
        self.skip_blank(newlines=False)
        c = self.peek()
        if c in ('"', "'"):
            self.string()
        elif c == "[":
            self.pos += 1
            self.skip_blank(newlines=True)
            while self.peek() != "]":
                self.value(path)
                self.skip_blank(newlines=True)
                if self.peek() == ",":
                    self.pos += 1
                    self.skip_blank(newlines=True)
            self.pos += 1
        elif c == "{":
            self.pos += 1
            self.skip_blank(newlines=False)
            while self.peek() != "}":
                self.pair(path)
                self.skip_blank(newlines=False)
                if self.peek() == ",":
                    self.pos += 1
                    self.skip_blank(newlines=False)
            self.pos += 1
        else:
            start = self.pos
            while self.peek() and self.peek() not in ",]}#\n":
                self.pos += 1
            if self.pos == start:
                raise ValueError(self.pos)

    def pair(self, table: list[str]) -> None:
        line = self.line
        path = table + self.key()
        self.found.setdefault(".".join(path), line)
        self.expect("=")
        self.value(path)

    def document(self) -> None:
        table: list[str] = []
        while True:
            self.skip_blank(newlines=True)
            if self.pos >= len(self.text):
                return
            if self.peek() == "[":
                double = self.peek(2) == "[["
                self.pos += 2 if double else 1
                line = self.line
                table = self.indexed(self.key())
                self.found.setdefault(".".join(table), line)
                if double:
                    # [[models]] starts members models[0], models[1]...
                    n = self.arrays.get(tuple(table), 0)
                    self.arrays[tuple(table)] = n + 1
                    table = [*table[:-1], f"{table[-1]}[{n}]"]
                    self.found.setdefault(".".join(table), line)
                self.expect("]")
                if double:
                    self.expect("]")
            else:
                self.pair(table)

    def indexed(self, key: list[str]) -> list[str]:
        """``key`` inside the last member of each array of tables it starts with:
        ``[models.openai]`` after a second ``[[models]]`` is ``models[1].openai``."""
        out: list[str] = []
        for part in key[:-1]:
            n = self.arrays.get((*out, part))
            out.append(part if n is None else f"{part}[{n - 1}]")
        return [*out, key[-1]]


def key_lines(text: str) -> dict[str, int]:
    """Map each table header and key in ``text`` (dotted path) to its 1-based line.

    Keys inside inline tables get the line where their own name appears.
    """
    scanner = _Scanner(text)
    try:
        scanner.document()
    except ValueError:  # the scanner met something it does not understand
        pass
    return scanner.found


def line_of(lines: Mapping[str, int], field: str) -> int | None:
    """The line of ``field``, else of its nearest enclosing table that is written out."""
    parts = field.split(".")
    while parts:
        line = lines.get(".".join(parts))
        if line is not None:
            return line
        last = parts.pop()
        if last.endswith("]"):  # models[2] written inline: the line of models
            parts.append(last[: last.index("[")])
    return None


def scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # JSON escapes are valid TOML basic-string escapes, except that TOML also
        # forbids a raw DEL; ensure_ascii stays off so no surrogate pairs appear.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        # An inline table (a pool member inside its array): unset fields left out.
        pairs = (f"{k} = {scalar(v)}" for k, v in value.items() if v is not None)
        return "{ " + ", ".join(pairs) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def write_toml(data: Mapping[str, Any]) -> str:
    """Render nested dicts of scalars and lists as TOML; ``None`` values are left out."""
    lines: list[str] = []
    _write_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_table(data: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    own = [f"{k} = {scalar(v)}" for k, v in data.items() if not isinstance(v, Mapping | None)]
    subtables = [(k, v) for k, v in data.items() if isinstance(v, Mapping)]
    if path and (own or not subtables):  # a table holding only tables needs no header
        lines += ["", f"[{'.'.join(path)}]"]
    lines += own
    for key, value in subtables:
        _write_table(value, [*path, key], lines)


def syntax_error(text: str, exc: tomllib.TOMLDecodeError) -> tuple[int, str]:
    """The line and a message for a ``tomllib`` error (which gives the line in its text)."""
    message = str(exc)
    found = _TOML_POSITION.search(message)
    if found is None:  # "(at end of document)"
        return text.count("\n") + 1, message.replace(" (at end of document)", " at end of file")
    return int(found[1]), f"{message[: found.start()]} at column {found[2]}"


def decode_table(cls: type[_S], data: object, path: str, out: list[Problem]) -> _S:
    """Decode one table key by key, so that every bad key is reported, not the first.

    Good values are kept and bad ones replaced by their defaults, so the result is
    complete enough for checks across fields. Problems are appended to ``out``.
    """
    if not isinstance(data, dict):
        out.append((path, f"expected a table, got {type(data).__name__}"))
        return cls()
    fields = {f.name: f for f in msgspec.structs.fields(cls)}
    good: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        info = fields.get(key)
        if info is None:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "expected " + ", ".join(fields)
            out.append((where, f"unknown key; {hint}"))
        elif isinstance(info.type, type) and issubclass(info.type, msgspec.Struct):
            good[key] = decode_table(info.type, value, where, out)
        elif (member := _table_of_list(info.type)) is not None and isinstance(value, list):
            good[key] = _decode_members(member, value, where, out)
        else:
            try:
                good[key] = msgspec.convert(value, type=info.type)
            except msgspec.ValidationError as exc:
                out.append((where, _explain(value, info.type, exc)))
    return cls(**good)


def _table_of_list(tp: Any) -> type[msgspec.Struct] | None:
    """The table type of a list of tables (``[[models]]``), else None."""
    base = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
    if typing.get_origin(base) is not list:
        return None
    (member,) = typing.get_args(base)
    return member if isinstance(member, type) and issubclass(member, msgspec.Struct) else None


def _decode_members(cls: type[_S], values: list[Any], path: str, out: list[Problem]) -> list[_S]:
    """Each member of an array of tables on its own (``models[1].openai.base_url``);
    a member that cannot be built is reported and left out."""
    members = []
    for i, value in enumerate(values):
        where = f"{path}[{i}]"
        if not isinstance(value, dict):
            out.append((where, f"expected a table, got {type(value).__name__}"))
            continue
        try:
            members.append(decode_table(cls, value, where, out))
        except TypeError as exc:  # a required key is missing: msgspec names it
            missing = _MISSING.search(str(exc))
            key = missing[1] if missing else "?"
            out.append((where, f"missing required key {key!r}"))
    return members


def _explain(value: object, tp: Any, exc: msgspec.ValidationError) -> str:
    """Say why ``value`` is not a ``tp``, in the words of the constraint it breaks."""
    base, *metas = typing.get_args(tp) if typing.get_origin(tp) is Annotated else (tp,)
    try:
        number = msgspec.convert(value, type=base)
    except msgspec.ValidationError as type_exc:
        choices = _choices(base)
        if choices and isinstance(value, str):
            return f"must be {' or '.join(choices)}, not {value!r}"
        text = str(type_exc).replace("`", "")
        return text[0].lower() + text[1:]
    broken = []
    for meta in metas:
        if meta.ge is not None and number < meta.ge:
            broken.append(f"must be >= {meta.ge}")
        if meta.gt is not None and number <= meta.gt:
            broken.append(f"must be > {meta.gt}")
        if meta.le is not None and number > meta.le:
            broken.append(f"must be <= {meta.le}")
        if meta.multiple_of is not None and number % meta.multiple_of:
            broken.append(f"must be a multiple of {meta.multiple_of}")
    return "; ".join(broken) or str(exc)


def _choices(tp: Any) -> list[str]:
    """The literal values (and "a list") that a field accepts, for messages."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    out = []
    for arg in typing.get_args(tp) if union else (tp,):
        if typing.get_origin(arg) is Literal:
            out += [repr(v) for v in typing.get_args(arg)]
        elif typing.get_origin(arg) is list:
            out.append("a list")
    return out

"""The commented default ``pipeline.toml``, written from the tables themselves.

``config init`` and the repository's ``config/pipeline.toml`` come from here,
and ``config schema`` from the same docstrings and ``_doc`` texts, so the file,
the schema and the code cannot drift apart (a test holds the repository's
file to this output). Layout:

- the root table's docstring is the file's header;
- a table's docstring is a comment under its header; a field's text is a
  comment above it, then the field with its default;
- a field whose default is unset (TOML has no null) is written commented out,
  with the first example of its ``_doc``; a list of tables gets its example as
  commented ``[[...]]`` blocks;
- a table of tables whose members share a base table (the stages and
  ``StageConfig``) lists the base's fields once, above the members; a member
  then writes them bare, unless it documents one its own way (the inference
  shards' ``replicas``).

Text is wrapped to ``WIDTH``; a line that starts with a space is kept as it is.
"""

from __future__ import annotations

import inspect
import re
import textwrap
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from mpipeline.config import _toml

# The longest comment line; the widest written default is shorter.
WIDTH = 88
# A `code span` is never broken across lines: its spaces are this while wrapping.
_GLUE = "\x00"
_CODE = re.compile(r"`[^`]*`")


def commented_toml(root: type[msgspec.Struct]) -> str:
    """The file for ``root`` with every field at its default, each documented."""
    lines = _comment(_table_doc(root))
    _write_table(root, root(), [], lines, shared=None)
    return "\n".join(lines) + "\n"


def field_texts(cls: type[msgspec.Struct]) -> Iterator[tuple[str, str, list[Any]]]:
    """``(name, text, examples)`` of every field of ``cls``, in order."""
    for info in msgspec.structs.fields(cls):
        text, examples = _meta(info.type)
        yield info.name, text, examples


def _write_table(
    cls: type[msgspec.Struct],
    value: msgspec.Struct,
    path: list[str],
    lines: list[str],
    shared: type[msgspec.Struct] | None,
) -> None:
    fields = msgspec.structs.fields(cls)
    tables = [f for f in fields if _is_table(f.type)]
    own = [f for f in fields if not _is_table(f.type)]
    if path and own:
        lines += ["", f"[{'.'.join(path)}]", *_comment(_table_doc(cls))]
    if own:
        lines.append("")
    bare = {name: text for name, text, _ in field_texts(shared)} if shared else {}
    for info in own:
        text, examples = _meta(info.type)
        if bare.get(info.name) != text:
            lines += _comment(text)
        _write_value(info.name, getattr(value, info.name), examples, [*path, info.name], lines)
    base = None if own else _shared_base([f.type for f in tables])
    if base is not None:
        lines += ["", *_comment(_table_doc(cls)), *_shared_list(base)]
    for info in tables:
        _write_table(info.type, getattr(value, info.name), [*path, info.name], lines, base)


def _write_value(
    name: str, value: object, examples: list[Any], path: list[str], lines: list[str]
) -> None:
    if value is None:
        if not examples:
            raise TypeError(f"{'.'.join(path)} is unset by default and has no example")
        lines.append(f"# {name} = {_toml.scalar(examples[0])}")
        return
    if examples and isinstance(examples[0], list) and examples[0]:
        lines.append("# For example:")
        for member in examples[0]:
            lines.append(f"#   [[{'.'.join(path)}]]")
            lines += (f"#   {k} = {_toml.scalar(v)}" for k, v in member.items())
    lines.append(f"{name} = {_toml.scalar(msgspec.to_builtins(value))}")


def _shared_list(base: type[msgspec.Struct]) -> list[str]:
    """The base's docstring, then its fields with their texts in a column."""
    texts = list(field_texts(base))
    column = max(len(name) for name, _, _ in texts) + 2
    lines = _comment(_table_doc(base))
    for name, text, _ in texts:
        first, *rest = _wrap(text, WIDTH - 4 - column)
        lines.append(f"#   {name:<{column}}{first}")
        lines += (f"#   {'':<{column}}{line}" for line in rest)
    return lines


def _shared_base(types_: list[Any]) -> type[msgspec.Struct] | None:
    """The nearest base table that every one of ``types_`` extends, if it has fields."""
    if len(types_) < 2:
        return None
    for base in types_[0].__mro__[1:]:
        if not (isinstance(base, type) and issubclass(base, msgspec.Struct)):
            return None
        if all(issubclass(t, base) for t in types_) and base.__struct_fields__:
            return base
    return None  # pragma: no cover - the MRO always ends outside msgspec.Struct


def _is_table(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _table_doc(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


def _meta(tp: Any) -> tuple[str, list[Any]]:
    """A field type's text and examples, from ``Annotated`` metadata, under ``| None`` too."""
    text, examples = "", list[Any]()
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    for arg in typing.get_args(tp) if union else (tp,):
        if typing.get_origin(arg) is Annotated:
            for meta in arg.__metadata__:
                if isinstance(meta, Meta):
                    text = meta.description or text
                    examples = list(meta.examples or examples)
    return text, examples


def _comment(text: str) -> list[str]:
    """``text`` as ``#`` lines: paragraphs wrapped, lines that start with a space kept."""
    out: list[str] = []
    for paragraph in text.split("\n\n"):
        if out:
            out.append("#")
        prose: list[str] = []
        for line in [*paragraph.splitlines(), ""]:
            if line.strip() and not line.startswith(" "):
                prose.append(line)
                continue
            out += (f"# {w}" for w in _wrap(" ".join(prose), WIDTH - 2))
            prose = []
            if line.strip():
                out.append(f"# {line.rstrip()}")
    return out


def _wrap(text: str, width: int) -> list[str]:
    """Words of ``text`` in lines of at most ``width``, keeping each code span whole."""
    glued = _CODE.sub(lambda m: m[0].replace(" ", _GLUE), " ".join(text.split()))
    lines = textwrap.wrap(glued, width, break_long_words=False, break_on_hyphens=False)
    return [line.replace(_GLUE, " ") for line in lines]

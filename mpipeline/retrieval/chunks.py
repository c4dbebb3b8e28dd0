"""The corpus: which files count, how they are cut into overlapping chunks, and
when the folder has changed.

Chunks are windows of ``size`` tokens that start every ``size - overlap``
tokens, so a sentence that straddles a boundary is whole in at least one
chunk (paragraph splitting lost those). A token here is a word or a single
punctuation mark: an estimate of a model's tokens that needs no vocabulary
and that the rag stage's context budget counts in the same unit. The text of
a chunk is a slice of the file, so its formatting reaches the model as written.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import NamedTuple

from mpipeline.errors import ConfigError

SUFFIXES = (".txt", ".md")
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# Bumped when the chunking or the saved layout changes: old index folders stop matching.
FORMAT = 1


class Chunk(NamedTuple):
    source: str  # the file, relative to the documents folder
    number: int  # the chunk's number within its file, from 0
    text: str


def count_tokens(text: str) -> int:
    """Tokens in ``text`` in the unit chunks and the context budget use."""
    return sum(1 for _ in _TOKEN.finditer(text))


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """``text`` as windows of ``size`` tokens, each sharing ``overlap`` with the last.

    The last window is not padded; a text of ``size`` tokens or fewer is one chunk.
    """
    if not 0 <= overlap < size:
        raise ValueError(f"overlap {overlap} must be >= 0 and < size {size}")
    spans = [m.span() for m in _TOKEN.finditer(text)]
    out: list[str] = []
    step = size - overlap
    for first in range(0, len(spans), step):
        last = min(first + size, len(spans)) - 1
        out.append(text[spans[first][0] : spans[last][1]])
        if last == len(spans) - 1:
            break
    return out


def corpus_files(folder: Path) -> list[Path]:
    """Every .txt/.md file under ``folder``, in a stable order.

    :raises ConfigError: naming the folder when it is missing or holds no such file.
    """
    if not folder.is_dir():
        raise ConfigError(f"stages.rag.documents: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"stages.rag.documents: {folder} holds no .txt or .md file")
    return files


def read_chunks(folder: Path, size: int, overlap: int) -> list[Chunk]:
    """Every chunk of every corpus file under ``folder``; blank files give none.

    :raises ConfigError: naming the folder when it has no corpus file or only blank ones.
    """
    out: list[Chunk] = []
    for path in corpus_files(folder):
        text = path.read_text(encoding="utf-8", errors="replace")
        source = path.relative_to(folder).as_posix()
        out += (Chunk(source, i, t) for i, t in enumerate(chunk_text(text, size, overlap)))
    if not out:
        raise ConfigError(f"stages.rag.documents: {folder} holds only blank files")
    return out


def fingerprint(folder: Path, size: int, overlap: int) -> str:
    """A name for this state of the corpus: it changes when a file is added, removed,
    rewritten (size or mtime) or chunked differently, and costs one stat per file."""
    digest = hashlib.blake2b(f"{FORMAT}:{size}:{overlap}".encode(), digest_size=10)
    for path in corpus_files(folder):
        st = path.stat()
        digest.update(f"\0{path.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()

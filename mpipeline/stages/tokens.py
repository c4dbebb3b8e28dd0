"""Token counters for assemble's budget: the model's own vocabulary, or an estimate.

A budget in characters does not hold in tokens (one character of code, of a
URL or of Chinese can be a token each), so assemble counts with the tokenizer
of the model a request goes to wherever this process can have it:

* ``Vocabulary``: a llama_cpp model's own tokenizer and chat template, loaded
  with ``vocab_only=True`` (the vocabulary and metadata, no weights: about a
  second, a few MiB). ``conversation`` renders the turns exactly as the
  llama_cpp worker does (``_chat_format.pick_template``), so a conversation
  that fits here fits the worker's ``n_ctx - max_tokens`` check token for token.
* ``Estimate``: everything else (OpenAI-compatible servers, Anthropic, pools,
  echo). No package on PyPI ships OpenAI's BPE files (``tiktoken`` downloads
  them at first use, and this project's machines reach PyPI only), and
  Anthropic publishes no tokenizer, so this is a documented estimate: a
  regex pre-tokenizer (letter runs with their leading space, 1-3 digits,
  punctuation runs) that charges each piece one token per 6 bytes, plus
  newlines. Measured against the Gemma 3 tokenizer (262k vocabulary, close to
  o200k's granularity) on this repository's README, sources and docs: within
  ±10 % on whole documents (0.94-1.09 x), per paragraph 0.65-2.0 x. Chat
  framing is charged as OpenAI's cookbook counts it: 4 tokens per message and
  3 priming the reply. It is an estimate: give an upstream whose context is
  tight a ``budget_tokens`` with a margin.

Both count a turn's text (``Turn.content``); image parts and tool-call JSON
that travel in ``Turn.raw`` are not counted.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from mpipeline.errors import ConfigError
from mpipeline.messages import Turn

__all__ = ["Estimate", "TokenCounter", "Vocabulary", "load_vocabulary"]


class TokenCounter(Protocol):
    """Counts the tokens of texts and of whole conversations for one model."""

    name: str
    # Tokens each turn costs beyond its text, and the conversation beyond its turns:
    # what the additive sum assemble searches with charges; ``conversation`` is exact.
    per_turn: int
    fixed: int

    def count(self, text: str) -> int:
        """Tokens of ``text`` as the content of a message."""
        ...

    def cut(self, text: str, limit: int) -> str:
        """The longest prefix of ``text`` ending on a token boundary, ``limit`` tokens at most."""
        ...

    def conversation(self, turns: Sequence[Turn]) -> int:
        """Tokens of the whole prompt ``turns`` make, framing and reply cue included."""
        ...


# Letter runs with one leading space (as BPE merges " word"), 1-3 digits (as o200k
# and Llama 3 split numbers), punctuation runs with one leading space, newlines.
_PIECE = re.compile(r" ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\n|[^\S\n]+|_+")
# The same pieces, with the ones that cost tokens in a group: ``findall`` then
# returns "" for a blank run, so ``count`` runs in C but for one numpy sum (it
# was 1.7 us a piece in Python, assemble's whole cost in ``bench --workload
# realistic``).
_COSTED = re.compile(r"( ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\n|_+)|[^\S\n]+")
# Bytes per token for one piece: long words and symbol runs are several tokens.
_BYTES_PER_TOKEN = 6


class Estimate:
    """A tokenizer-free count: a regex pre-tokenizer and a bytes-per-token rule."""

    per_turn = 4
    fixed = 3

    def __init__(self, name: str = "estimate") -> None:
        self.name = name

    def count(self, text: str) -> int:
        # ``_piece`` per piece, vectorised: a costed piece of n bytes is ceil(n / 6)
        # tokens, at least 1 because it is never empty; a blank run is "" here, 0.
        pieces = _COSTED.findall(text)
        if not pieces:
            return 0
        sizes = map(len, pieces if text.isascii() else map(str.encode, pieces))
        n = np.fromiter(sizes, dtype=np.int64, count=len(pieces))
        return int(((n + (_BYTES_PER_TOKEN - 1)) // _BYTES_PER_TOKEN).sum())

    def cut(self, text: str, limit: int) -> str:
        used = 0
        for m in _PIECE.finditer(text):
            used += self._piece(m.group())
            if used > limit:
                return text[: m.start()]
        return text

    def conversation(self, turns: Sequence[Turn]) -> int:
        return sum(self.count(t.content) + self.per_turn for t in turns) + self.fixed

    @staticmethod
    def _piece(piece: str) -> int:
        if piece.isspace() and piece != "\n":
            return 0  # runs of blanks merge into the next piece's token
        return max(1, math.ceil(len(piece.encode()) / _BYTES_PER_TOKEN))


class Vocabulary:
    """A llama.cpp model's tokenizer and chat template, without its weights."""

    def __init__(self, llm: Any, chat_format: str | None, name: str) -> None:
        # Imported here: assemble imports this module for every worker; only a
        # llama_cpp model needs llama-cpp-python, and it is optional.
        from mpipeline.workers._chat_format import pick_template

        self.name = name
        self._llm = llm
        self._template = pick_template(llm, chat_format)
        # Gemma's framing: "<start_of_turn>user\n" and "<end_of_turn>\n" around a
        # turn, measured so that other templates get their own figure.
        one = [Turn(role="user", content="x")]
        self.fixed = len(self._template([]))
        self.per_turn = max(0, len(self._template(one)) - self.fixed - self.count("x"))

    def _ids(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=False, special=False))

    def count(self, text: str) -> int:
        return len(self._ids(text)) if text else 0

    def cut(self, text: str, limit: int) -> str:
        ids = self._ids(text)
        if len(ids) <= limit:
            return text
        data = text.encode()
        # Each token's piece, in order, is the text's bytes: the first ``limit`` pieces'
        # length is where the cut goes; a character split there is left out whole.
        size = sum(len(self._llm.detokenize([i])) for i in ids[: max(0, limit)])
        while size > 0:
            prefix = data[:size].decode(errors="ignore")
            if self.count(prefix) <= limit:
                return prefix
            size -= 1
        return ""

    def conversation(self, turns: Sequence[Turn]) -> int:
        return len(self._template(turns))

    def close(self) -> None:
        """Free the vocabulary now rather than at interpreter exit."""
        self._llm.close()


def load_vocabulary(model_path: str, chat_format: str | None) -> Vocabulary:
    """The vocabulary of the GGUF at ``model_path`` ("" for the packaged Gemma).

    :raises ConfigError: if llama-cpp-python is missing or the file cannot load
    """
    try:
        llama: Any = importlib.import_module("llama_cpp")
        from mpipeline.workers.llama_cpp import packaged_model
    except ImportError as exc:
        raise ConfigError(
            "assemble counts llama_cpp tokens with the model's vocabulary, which needs "
            "llama-cpp-python: pip install 'mpipeline[llama]'"
        ) from exc
    path = model_path or packaged_model()
    try:
        llm = llama.Llama(model_path=path, vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"assemble cannot load the vocabulary of {path}: {exc}") from exc
    return Vocabulary(llm, chat_format, name=path)

"""Chat turns to prompt tokens for the llama_cpp worker, in the model's own format.

Why the worker renders prompts itself instead of calling llama-cpp-python's
``create_chat_completion``: the packaged Gemma 3 270M GGUF (a conversion of the
base model) carries no ``tokenizer.chat_template``, and llama-cpp-python then
falls back to its ``llama-2`` format ("[INST] Hello [/INST]"). Gemma continues
that with the text "</s>", a token llama.cpp counts as end-of-generation, so
every chat completion had 0 tokens. ``pick_template`` uses the GGUF's template
when there is one, Gemma's own format for Gemma models without one, and a named
llama-cpp-python format when the config asks for it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mpipeline.errors import ConfigError
from mpipeline.messages import Turn


class ChatTemplate(Protocol):
    """Renders a conversation, ending with the model's turn opened, as token ids.

    ``stops`` are stop tokens beyond llama.cpp's end-of-generation set.
    """

    stops: set[int]

    def __call__(self, turns: Sequence[Turn]) -> list[int]: ...


class _NoTemplate:
    stops: set[int] = set()

    def __call__(self, turns: Sequence[Turn]) -> list[int]:
        return []


# What a worker holds before its model is loaded: it renders nothing.
NO_TEMPLATE: ChatTemplate = _NoTemplate()


class GemmaTemplate:
    """Gemma's chat format, as its official template renders it, as tokens.

    Gemma has no system role: system text opens the next user turn, followed by a
    blank line. Content is tokenized without special tokens, so a user who types
    "<end_of_turn>" gets text, not a turn boundary, and each earlier turn
    tokenizes the same way on every later turn, which keeps cached prefixes valid.
    The one BOS comes first; ``<end_of_turn>`` and ``<eos>`` end the reply as
    end-of-generation tokens, so no extra stops are needed.
    """

    def __init__(self, llm: Any) -> None:
        self.stops: set[int] = set()
        self._llm = llm
        self._bos: int = llm.token_bos()
        self._open = {role: self._special(f"<start_of_turn>{role}\n") for role in ("user", "model")}
        self._close = self._special("<end_of_turn>\n")

    def _special(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=False, special=True))

    def _text(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode(), add_bos=False, special=False))

    def __call__(self, turns: Sequence[Turn]) -> list[int]:
        out = [self._bos]
        prefix = ""
        for turn in turns:
            if turn.role == "system":
                prefix += turn.content + "\n\n"
                continue
            role = "model" if turn.role == "assistant" else "user"
            text = turn.content.strip()
            if role == "user":
                text, prefix = prefix + text, ""
            out += self._open[role] + self._text(text) + self._close
        if prefix:  # system text and no user turn after it
            out += self._open["user"] + self._text(prefix.strip()) + self._close
        return out + self._open["model"]


class FormatterTemplate:
    """Any other chat format: the GGUF's Jinja template or a llama-cpp-python format."""

    def __init__(self, llm: Any, formatter: Callable[..., Any]) -> None:
        self.stops: set[int] = set()
        self._llm = llm
        self._formatter = formatter

    def __call__(self, turns: Sequence[Turn]) -> list[int]:
        result = self._formatter(messages=[{"role": t.role, "content": t.content} for t in turns])
        stops = [result.stop] if isinstance(result.stop, str) else result.stop or []
        for stop in stops:  # a stop string that is one special token is a stop token
            ids = self._llm.tokenize(stop.encode(), add_bos=False, special=True)
            if len(ids) == 1:
                self.stops.add(ids[0])
        # A template that writes the BOS itself says so (added_special); a second
        # BOS from the tokenizer would change what the model sees.
        add_bos = not result.added_special
        return list(self._llm.tokenize(result.prompt.encode(), add_bos=add_bos, special=True))


def pick_template(llm: Any, chat_format: str | None) -> ChatTemplate:
    """The template for a loaded ``llama_cpp.Llama``.

    ``chat_format``: None for the model's own (the GGUF's template; Gemma's format
    for Gemma models without one; else chatml), "gemma" for ``GemmaTemplate`` (it
    keeps the system text that llama-cpp-python's "gemma" format drops), or the
    name of a llama-cpp-python format ("chatml", "llama-3", ...).

    :raises ConfigError: if ``chat_format`` names no known format
    """
    formats: Any = importlib.import_module("llama_cpp.llama_chat_format")
    gguf = llm.metadata.get("tokenizer.chat_template")
    is_gemma = llm.metadata.get("general.architecture", "").startswith("gemma")
    if chat_format == "gemma" or (chat_format is None and gguf is None and is_gemma):
        return GemmaTemplate(llm)
    if chat_format is None and gguf is not None:
        text = llm._model.token_get_text
        formatter = formats.Jinja2ChatFormatter(
            template=gguf, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos())
        )
        return FormatterTemplate(llm, formatter)
    name = chat_format or "chatml"
    # llama-cpp-python registers "llama-2" as format_llama2, "mistral-instruct" as
    # format_mistral_instruct: try both spellings of the function name.
    for attr in ("format_" + name.replace("-", "_"), "format_" + name.replace("-", "")):
        if callable(found := getattr(formats, attr, None)):
            return FormatterTemplate(llm, found)
    raise ConfigError(f"llama_cpp: unknown chat_format {name!r}")


__all__ = ["NO_TEMPLATE", "ChatTemplate", "FormatterTemplate", "GemmaTemplate", "pick_template"]

"""What a request asks of llama.cpp's sampler: its sampling fields and its JSON grammar.

``temperature``, ``top_p``, ``seed`` and the penalties set the sampler of one
generation over the config's defaults. ``response_format`` json_schema becomes
a GBNF grammar (llama-cpp-python's own converter, ``LlamaGrammar.from_json_schema``),
and json_object the JSON grammar llama.cpp ships, so the model can only write
a document that parses (and, for a schema, matches it); the inference stage
then marks the reply verbatim, so post leaves it as the model wrote it.

llama.cpp parses the grammar in C when the sampler is built, and a grammar it
cannot parse gives a null sampler that the sampler chain would take as one:
so each grammar is first built alone and freed, and one that fails is the
request's error (``invalid_request``), as is a schema the converter refuses.
"""

from __future__ import annotations

import functools
from typing import Any

from mpipeline.config import LlamaCppConfig
from mpipeline.workers._failures import invalid_request
from mpipeline.workers._params import Sampling, response_format

__all__ = ["MIN_P", "SEED_RANGE", "TOP_K", "TOP_P", "grammar", "sampled"]

# Sampling around ``temperature`` (llama-cpp-python's own defaults); 0 is greedy.
TOP_K = 40
TOP_P = 0.95
MIN_P = 0.05
# llama.cpp seeds are 32-bit, and all ones means "draw one at random".
SEED_RANGE = 0xFFFFFFFF
# What json_schema_to_gbnf raises for a schema it cannot convert (it asserts).
_SCHEMA_ERRORS = (AssertionError, ValueError, KeyError, TypeError, RecursionError)


def grammar(lib: Any, llm: Any, params: bytes) -> Any:
    """The ``LlamaGrammar`` a request's ``response_format`` asks for, or None.

    :raises UpstreamFailure: ``invalid_request`` for a schema that makes no grammar
    """
    fmt = response_format(params)
    if fmt is None:
        return None
    schema = fmt.json_schema
    if (
        fmt.type == "json_schema"
        and schema is not None
        and bytes(schema.schema)
        not in (
            b"",
            b"null",
        )
    ):
        text = _schema_grammar(lib, bytes(schema.schema))
    else:
        text = lib.llama_grammar.JSON_GBNF
    out = lib.LlamaGrammar.from_string(text, verbose=False)
    sampler = lib.llama_sampler_init_grammar(
        llm._model.vocab, out._grammar.encode(), out._root.encode()
    )
    if not sampler:
        raise invalid_request("response_format: llama.cpp cannot parse the schema's grammar")
    lib.llama_sampler_free(sampler)
    return out


@functools.lru_cache(maxsize=64)
def _schema_grammar(lib: Any, schema: bytes) -> str:
    """A schema's GBNF (cached: an agent sends the same schema on every call)."""
    try:
        return str(lib.llama_grammar.json_schema_to_gbnf(schema.decode()))
    except _SCHEMA_ERRORS as exc:
        raise invalid_request(f"response_format: the JSON schema makes no grammar: {exc}") from None
    except UnicodeDecodeError:
        raise invalid_request("response_format: the JSON schema is not UTF-8") from None


def sampled(
    lib: Any, llm: Any, cfg: LlamaCppConfig, tokens: list[int], sample: Sampling, rules: Any
) -> Any:
    """llama.cpp's token generator, with the request's sampling over the config's and
    the grammar ``rules`` (None: free text)."""
    # The sampler is seeded afresh by each generate(): the same seed, the same reply.
    # The config's 0 (the default) means llama.cpp's random seed.
    if sample.seed is not None:
        llm.set_seed(sample.seed % SEED_RANGE)
    else:
        llm.set_seed(cfg.seed or lib.LLAMA_DEFAULT_SEED)
    return llm.generate(
        tokens,
        temp=cfg.temperature if sample.temperature is None else sample.temperature,
        top_k=TOP_K,
        top_p=TOP_P if sample.top_p is None else sample.top_p,
        min_p=MIN_P,
        repeat_penalty=1.0,
        frequency_penalty=sample.frequency_penalty or 0.0,
        presence_penalty=sample.presence_penalty or 0.0,
        reset=False,
        grammar=rules,
    )

"""Hypothesis strategies for every message in ``mpipeline.messages``, per edge."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from mpipeline.errors import ErrorCode
from mpipeline.messages import (
    Assembled,
    Completed,
    Failed,
    Passage,
    Priority,
    PromptRequest,
    Retrieved,
    TokenChunk,
    Usage,
)

# Any encodable text, with NULs, emoji (incl. ZWJ sequences) and combining marks
# made likely rather than left to chance.
SPECIAL_PIECES = ["\x00", "😀", "👩\u200d👩\u200d👧", "e\u0301", "\u200b", "\U0010ffff", "ß"]
texts = st.lists(st.characters(codec="utf-8") | st.sampled_from(SPECIAL_PIECES), max_size=24).map(
    "".join
)
# msgpack integers: int64 and uint64.
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
session_ids = st.none() | texts

prompt_requests = st.builds(
    PromptRequest,
    request_id=texts,
    session_id=session_ids,
    input=texts,
    metadata=st.dictionaries(texts, texts, max_size=4),
    priority=st.sampled_from(Priority),
    deadline_ns=ints,
    reply_to=ints,
    stream=st.booleans(),
    max_tokens=st.none() | ints,
    stamps=st.dictionaries(texts, ints, max_size=6),
)
passages = st.builds(Passage, source=texts, text=texts, score=st.floats(allow_nan=False))
retrieved = st.builds(Retrieved, request=prompt_requests, context=st.lists(passages, max_size=4))
assembled = st.builds(Assembled, request=prompt_requests, prompt=texts, dedup_key=texts)
token_chunks = st.builds(
    TokenChunk, request_id=texts, session_id=session_ids, reply_to=ints, index=ints, text=texts
)
completed = st.builds(
    Completed,
    request_id=texts,
    session_id=session_ids,
    reply_to=ints,
    text=texts,
    usage=st.builds(Usage, prompt_tokens=ints, completion_tokens=ints),
    finish_reason=texts,
    stamps=st.dictionaries(texts, ints, max_size=6),
)
failed = st.builds(
    Failed,
    request_id=texts,
    session_id=session_ids,
    reply_to=ints,
    code=st.sampled_from(ErrorCode),
    reason=texts,
    stage=texts,
)

# Keyed like messages.EDGE_TYPES: the messages each consuming stage accepts.
EDGE_MESSAGES: dict[str, st.SearchStrategy[Any]] = {
    "rag": prompt_requests,
    "assemble": retrieved | failed,
    "inference": assembled | failed,
    "post": token_chunks | completed | failed,
    "stream": token_chunks | completed | failed,
    "gateway": token_chunks | completed | failed,
}
any_message = st.one_of(prompt_requests, retrieved, assembled, token_chunks, completed, failed)

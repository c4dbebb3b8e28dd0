"""What redaction adds to post per streamed chunk of 16 tokens (issue 17: <= 5 µs).

Run: ``.venv/bin/pytest bench/micro/test_redact.py --benchmark-group-by=group``;
``scripts/test.sh`` runs it with ``--benchmark-disable`` as a smoke test. One
round is one whole reply through ``Post.process``: ``CHUNKS`` chunks of 16
tokens (words and the punctuation after them, about 80 characters) and the
``Completed`` (which is redacted once more, whole). Divide a round by
``CHUNKS`` for the cost per chunk; the figure the issue asks for is redaction
on minus redaction off, on the same reply.

* prose: replies in ordinary words with numbers (years, versions, times), the
  common case: most chunks take the cheap checks only.
* planted: the same with a secret of a random kind in every fourth chunk.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from mpipeline.config import PipelineConfig, PostConfig, RedactConfig
from mpipeline.messages import Completed, Message, TokenChunk, Usage
from mpipeline.stages import StageContext
from mpipeline.stages.post import Post
from tests.redaction_samples import AFTER, BEFORE, KINDS, PUNCTUATION, WORDS

CHUNKS = 64
TOKENS_PER_CHUNK = 16


def reply(planted: bool, seed: int = 17) -> list[str]:
    """CHUNKS chunks of 16 tokens: a word and what follows it count as one token."""
    rng = random.Random(seed)
    chunks = []
    for i in range(CHUNKS):
        parts = []
        for _ in range(TOKENS_PER_CHUNK):
            parts += [rng.choice(WORDS), rng.choice(PUNCTUATION)]
        if planted and i % 4 == 1:
            value = KINDS[rng.choice(list(KINDS))](rng)
            parts[rng.randrange(0, len(parts), 2)] = rng.choice(BEFORE) + value + rng.choice(AFTER)
        chunks.append("".join(parts))
    return chunks


def stream(redact: bool, texts: list[str]) -> Callable[[], list[Message]]:
    config = PostConfig(strip=False, redact=RedactConfig(enabled=redact))
    post = Post(config, StageContext("post", 0, 1, PipelineConfig(), segments="mpl-bench"))
    chunks = [
        TokenChunk(request_id="r", session_id=None, reply_to=0, index=i, text=t)
        for i, t in enumerate(texts)
    ]
    done = Completed(
        request_id="r",
        session_id=None,
        reply_to=0,
        text="".join(texts),
        usage=Usage(prompt_tokens=1, completion_tokens=CHUNKS * TOKENS_PER_CHUNK),
    )
    process = post.process

    def run() -> list[Message]:
        out: list[Message] = []
        for chunk in chunks:
            out += process(chunk)
        out += process(done)
        return out

    return run


@pytest.mark.parametrize("planted", [False, True], ids=["prose", "planted"])
@pytest.mark.parametrize("redact", [False, True], ids=["off", "on"])
def test_post_reply(benchmark: BenchmarkFixture, redact: bool, planted: bool) -> None:
    texts = reply(planted)
    benchmark.group = (
        f"post, one reply of {CHUNKS} chunks x 16 tokens ({'planted' if planted else 'prose'})"
    )
    benchmark.extra_info["chunks_per_round"] = CHUNKS
    out = benchmark(stream(redact, texts))
    streamed = "".join(m.text for m in out[:-1] if isinstance(m, TokenChunk))
    done = out[-1]
    assert isinstance(done, Completed) and streamed == done.text
    if redact and planted:
        assert streamed != "".join(texts) and "[" in streamed
    if not redact:
        assert streamed == "".join(texts)

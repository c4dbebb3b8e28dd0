"""The leak run of issue 17: no planted secret in 100,000 randomly split streams.

Each stream is random prose with one to four planted secrets of random kinds
(``tests/redaction_samples.py``: emails, phone numbers, Luhn-valid cards,
mod-97 IBANs, SSNs, IPv4/IPv6 addresses, provider keys, bearer tokens,
high-entropy strings), cut into 1 to 40 chunks at random places and sent
through ``Post.process`` as a stream with its ``Completed``, under a random
action (mask, hash, drop). It counts a leak for every planted secret found in
what the client would receive, and a mismatch for every stream whose text
differs from the redacted whole text (the Completed).

Run: ``.venv/bin/python -m bench.redact_leaks [--streams N] [--seed S]``;
exit 1 on any leak or mismatch.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from mpipeline.config import PipelineConfig, PostConfig, RedactConfig
from mpipeline.messages import Completed, Message, TokenChunk, Usage
from mpipeline.stages import StageContext
from mpipeline.stages.post import Post
from mpipeline.stages.redact import ENTITIES
from tests.redaction_samples import planted_text, random_split

USAGE = Usage(prompt_tokens=1, completion_tokens=1)


def _post(action: str) -> Post:
    redact = RedactConfig(enabled=True, **dict.fromkeys(ENTITIES, action))  # type: ignore[arg-type]
    config = PostConfig(strip=False, redact=redact)
    return Post(config, StageContext("post", 0, 1, PipelineConfig(), segments="mpl-leaks"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    stages = {a: _post(a) for a in ("mask", "hash", "drop")}
    leaks = mismatches = planted_total = chunks_total = 0
    started = time.perf_counter()
    for n in range(args.streams):
        text, planted = planted_text(rng, rng.randint(1, 4))
        pieces = random_split(rng, text, rng.randint(1, 40))
        stage = stages[rng.choice(("mask", "hash", "drop"))]
        rid = f"s{n}"
        out: list[Message] = []
        for i, piece in enumerate(pieces):
            out += stage.process(
                TokenChunk(request_id=rid, session_id=None, reply_to=0, index=i, text=piece)
            )
        out += stage.process(
            Completed(request_id=rid, session_id=None, reply_to=0, text=text, usage=USAGE)
        )
        streamed = "".join(m.text for m in out if type(m) is TokenChunk)
        done = out[-1]
        assert isinstance(done, Completed)
        leaked = [value for value in planted if value in streamed or value in done.text]
        if leaked:
            leaks += len(leaked)
            print(f"LEAK seed={args.seed} stream={n}: {leaked!r} in {text!r}", file=sys.stderr)
        if streamed != done.text:
            mismatches += 1
            print(f"MISMATCH seed={args.seed} stream={n}: {text!r}", file=sys.stderr)
        planted_total += len(planted)
        chunks_total += len(pieces)
    elapsed = time.perf_counter() - started
    print(
        f"{args.streams:,} streams, {chunks_total:,} chunks, {planted_total:,} planted secrets: "
        f"{leaks} leaked, {mismatches} streams differ from the redacted whole text "
        f"({elapsed:.1f} s, seed {args.seed})"
    )
    return 1 if leaks or mismatches else 0


if __name__ == "__main__":
    sys.exit(main())

"""``mpipeline bench --workload realistic``: the stages doing real work, not echo alone.

The default workload measures the pipeline's own cost (every stage passes
the request on). This one gives each stage the work issue 17 built for it,
so that the processes have CPU to spread over cores: rag searches a
generated corpus of ``FILES * PASSAGES_PER_FILE`` passages (BM25, top 3),
assemble fits a chat template under a token budget, the echo worker streams
the prompt's input back token by token, which carries planted PII and
secrets, and post redacts them chunk by chunk. Every request is streamed and
read to its end by a task of its own, as a gateway reads it, on both sides:
the same config and stage classes run in the pipeline and in the
single-process asyncio baseline (``bench.cores`` drives both).

The corpus is written with a seeded RNG, so every run searches the same
text; it lives in a temporary folder for the run. After the timed phases
each side answers ``CHECK_REQUESTS`` more requests whose streams are read: a
planted value in one is a leak, a stream that differs from its final text is
counted, and the placeholders are counted, so a benchmark whose stages
stopped doing their work fails instead of looking fast.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec

from mpipeline.config import PipelineConfig
from mpipeline.messages import Completed, TokenChunk

if TYPE_CHECKING:
    from mpipeline.bench.report import Report, Run, Verdict

FILES = 500
PASSAGES_PER_FILE = 20
# Words per passage; rag's chunk_tokens is set to it with no overlap, so each file
# of FILES makes exactly PASSAGES_PER_FILE passages.
PASSAGE_WORDS = 50
VOCABULARY = 3000
SEED = 17
TOP_K = 3
BUDGET_TOKENS = 512
# Words of the prompt that rag searches for, after the planted values.
QUERY_WORDS = 6
CHECK_REQUESTS = 256
QUICK_CHECK_REQUESTS = 32
# Fixed-rate phases: rag's work caps the rate far below the echo workload's.
RATES = (200.0, 1000.0)
QUICK_RATES = (200.0,)
# Issue 17's targets (2 cores, one run).
TARGET_RATIO = 1.7
TARGET_EFFICIENCY = 0.85
TARGET_CORES = 2

# Planted values, one of each kind per prompt, all valid for their kind (cards pass
# Luhn): fixed strings, since the bench may not import the tests' generators.
EMAILS = ("alice.smith@example.com", "bob+orders@mail.example.org", "ops-team@corp.example.net")
CARDS = ("4111111111111111", "5500000000000004", "6011000000000004", "340000000000009")
KEYS = (
    "sk-proj-4fQ9xT2mLk8ZbW1vR7nY3cHs",
    "ghp_9aZ3kLm0pQ7rS2tU5vW8xY1bC4dE6fG0hJ2k",
    "AKIAIOSFODNN7EXAMPLE",
)
SSNS = ("123-45-6789", "219-09-9999", "512-34-8765")
PLANTED = (*EMAILS, *CARDS, *KEYS, *SSNS)
PLACEHOLDERS = ("[email]", "[card]", "[api_key]", "[ssn]")


def vocabulary(seed: int = SEED, size: int = VOCABULARY) -> list[str]:
    """``size`` distinct pronounceable lower-case words, the same for the same seed."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    words: dict[str, None] = {}
    while len(words) < size:
        words["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))] = None
    return list(words)


def write_corpus(folder: Path, *, files: int = FILES, seed: int = SEED) -> int:
    """Write ``files`` .md files of ``PASSAGES_PER_FILE`` passages; the passage count.

    Words are drawn with Zipf-like weights, as in prose: a few are in most
    passages and most are rare, so BM25 scores vary as they do on real text.
    """
    rng = random.Random(seed)
    words = vocabulary(seed)
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    folder.mkdir(parents=True, exist_ok=True)
    per_file = PASSAGE_WORDS * PASSAGES_PER_FILE
    for i in range(files):
        text = rng.choices(words, weights, k=per_file)
        lines = [" ".join(text[j : j + 10]) for j in range(0, per_file, 10)]
        (folder / f"doc-{i:04d}.md").write_text("\n".join(lines) + "\n", encoding="ascii")
    return files * PASSAGES_PER_FILE


def prompts(seed: int = SEED) -> Iterator[str]:
    """Unique prompts: an id, one planted value of each kind, then words to search for.

    ``seed`` picks the query words (the corpus is always ``SEED``'s).

    Echo replies with the first 16 words of the input (the bench's max_tokens),
    which hold every planted value, so every reply needs redacting.
    """
    rng = random.Random(seed + 1)
    # Mid-frequency words of the corpus: common enough to hit, rare enough to rank
    # passages apart.
    pool = vocabulary(SEED)[50:1500]
    i = 0
    while True:
        query = " ".join(rng.sample(pool, QUERY_WORDS))
        yield (
            f"{i:010d} mail {EMAILS[i % 3]} card {CARDS[i % 4]} key {KEYS[i % 3]} "
            f"ssn {SSNS[i % 3]} {query}"
        )
        i += 1


def configure(base: PipelineConfig, corpus: Path, index_dir: Path) -> PipelineConfig:
    """``base`` with rag on ``corpus``, assemble's token budget and post's redaction on."""
    stages = base.stages
    rag = msgspec.structs.replace(
        stages.rag,
        enabled=True,
        documents=str(corpus),
        index_dir=str(index_dir),
        top_k=TOP_K,
        chunk_tokens=PASSAGE_WORDS,
        chunk_overlap=0,
        reload_poll_s=0.0,
    )
    assemble = msgspec.structs.replace(stages.assemble, budget_tokens=BUDGET_TOKENS)
    redact = msgspec.structs.replace(stages.post.redact, enabled=True)
    post = msgspec.structs.replace(stages.post, redact=redact)
    return msgspec.structs.replace(
        base, stages=msgspec.structs.replace(stages, rag=rag, assemble=assemble, post=post)
    )


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """What the streamed replies of one side showed after its timed phases."""

    replies: int
    failed: int
    # Chunks read, over all replies (each reply is streamed).
    chunks: int
    # Placeholders in the streams: each is one planted value redacted.
    redactions: int
    # Replies in which a planted value survived in the stream or the final text (must be 0).
    leaked: int
    # Replies whose chunks, joined, differ from their final text (must be 0).
    torn: int
    # Replies that carried rag's citations (each should).
    cited: int


class StreamTarget(Protocol):
    """A pipeline a request can be streamed from: ``Pipeline`` and the baseline."""

    def stream_events(
        self, text: str, *, session_id: str | None = ..., max_tokens: int | None = ...
    ) -> AsyncIterator[TokenChunk | Completed]: ...


async def read_stream(
    target: StreamTarget, text: str, session_id: str | None, max_tokens: int | None
) -> tuple[str, int, Completed]:
    """Stream one request to its end: the chunks' text joined, their count, the result."""
    parts: list[str] = []
    async for event in target.stream_events(text, session_id=session_id, max_tokens=max_tokens):
        if isinstance(event, Completed):
            return "".join(parts), len(parts), event
        parts.append(event.text)
    raise RuntimeError("the stream ended without its Completed")


class Streamed:
    """``target`` as the load generator's ``Target``: every request streamed, and
    read chunk by chunk by a task of its own (the future the generator gets)."""

    def __init__(self, target: StreamTarget) -> None:
        self._target = target

    def submit_nowait(
        self, text: str, *, session_id: str | None = None, max_tokens: int | None = None
    ) -> asyncio.Future[Completed]:
        return asyncio.ensure_future(self._read(text, session_id, max_tokens))

    async def _read(self, text: str, session_id: str | None, max_tokens: int | None) -> Completed:
        return (await read_stream(self._target, text, session_id, max_tokens))[2]


@dataclass
class Realistic:
    """The realistic workload of one bench run: its config, prompts and checks."""

    config: PipelineConfig
    passages: int
    check_requests: int
    rates: tuple[float, ...]
    # The stages that get a replica per core: the two with the most work (of the
    # stage work, assemble's token counting is about half and rag's search a quarter;
    # post's redaction a fifth, inference and stream a few % each: bench/RESULTS.md).
    heavy: tuple[str, ...] = ("rag", "assemble")
    checks: dict[str, Check] = field(default_factory=dict)

    def prompts(self) -> Iterator[str]:
        return prompts()

    def target(self, target: StreamTarget) -> Streamed:
        """What the timed phases drive: ``target`` with every request streamed."""
        return Streamed(target)

    async def check(self, target: StreamTarget, label: str) -> None:
        """Stream ``check_requests`` prompts from ``target`` and read what came back."""
        texts = prompts(SEED + 99)
        reads = [
            read_stream(target, next(texts), f"check-{i}", 16) for i in range(self.check_requests)
        ]
        results = await asyncio.gather(*reads, return_exceptions=True)
        done = [r for r in results if not isinstance(r, BaseException)]
        self.checks[label] = Check(
            replies=len(done),
            failed=len(results) - len(done),
            chunks=sum(n for _, n, _ in done),
            redactions=sum(text.count(p) for text, _, _ in done for p in PLACEHOLDERS),
            leaked=sum(any(v in t or v in r.text for v in PLANTED) for t, _, r in done),
            torn=sum(t != r.text for t, _, r in done),
            cited=sum(bool(r.citations) for _, _, r in done),
        )

    def problems(self) -> list[str]:
        """Why the run did not do the work it claims; empty when it did."""
        out = []
        for label, c in self.checks.items():
            if c.failed or not c.replies:
                out.append(f"{label}: {c.failed} of {c.replies + c.failed} check requests failed")
            if c.leaked:
                out.append(f"{label}: {c.leaked} replies leaked a planted value")
            if c.torn:
                out.append(f"{label}: {c.torn} streams differ from their final text")
            if c.chunks < c.replies * 2:
                out.append(f"{label}: {c.chunks} chunks in {c.replies} replies (not streamed)")
            if c.redactions < c.replies * len(PLACEHOLDERS):
                out.append(f"{label}: {c.redactions} redactions in {c.replies} replies")
            if c.cited < c.replies:
                out.append(f"{label}: {c.replies - c.cited} replies without citations")
        return out

    def verdicts(self, runs: list[Run], baseline: Run | None) -> list[Verdict]:
        """Issue 17's targets: the ratio to the baseline and the 1 -> 2 core scaling."""
        from mpipeline.bench.report import Verdict

        by_cores = {r.cores: r for r in runs}
        two = by_cores.get(TARGET_CORES)
        out: list[Verdict] = []
        if two is None or two.full is None:
            return out
        if baseline is not None and baseline.full is not None and baseline.full.throughput_rps:
            ratio = two.full.throughput_rps / baseline.full.throughput_rps
            met = ratio >= TARGET_RATIO
            out.append(
                Verdict(target="x asyncio baseline", goal=TARGET_RATIO, measured=ratio, met=met)
            )
        if two.efficiency is not None and 1 in by_cores:
            eff = two.efficiency
            met = eff >= TARGET_EFFICIENCY
            out.append(
                Verdict(
                    target="efficiency 1->2 cores", goal=TARGET_EFFICIENCY, measured=eff, met=met
                )
            )
        return out

    def summary(self) -> str:
        lines = [f"realistic workload: rag over {self.passages:,} passages, checks of the replies:"]
        for label, c in self.checks.items():
            lines.append(
                f"  {label:<20} {c.replies} streamed replies, {c.chunks} chunks, "
                f"{c.redactions} redactions, {c.leaked} leaked, {c.torn} torn, "
                f"{c.cited} cited, {c.failed} failed"
            )
        return "\n".join(lines)

    def settings(self) -> dict[str, int | str]:
        return {
            "workload": "realistic",
            "prompt_bytes": len(next(prompts())),
            "passages": self.passages,
            "top_k": TOP_K,
            "budget_tokens": BUDGET_TOKENS,
            "redaction": "on",
            "streamed": "every request, read chunk by chunk",
        }

    def report(self, report: Report) -> Report:
        """``report`` with this workload's settings, checks and verdicts."""
        settings = {**report.settings, **self.settings()}
        return msgspec.structs.replace(
            report,
            settings=settings,
            checks={k: msgspec.structs.asdict(v) for k, v in self.checks.items()},
            verdicts=self.verdicts(report.runs, report.baseline),
        )


def realistic(folder: Path, *, quick: bool) -> Realistic:
    """The workload, its corpus written into ``folder`` (the caller removes it)."""
    passages = write_corpus(folder / "corpus")
    base = PipelineConfig()
    return Realistic(
        config=configure(base, folder / "corpus", folder / "index"),
        passages=passages,
        check_requests=QUICK_CHECK_REQUESTS if quick else CHECK_REQUESTS,
        rates=QUICK_RATES if quick else RATES,
    )


def temp_folder() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="mpipeline-bench-corpus-")

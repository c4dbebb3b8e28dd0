"""Local-model shards: generation throughput per core, and what session affinity buys.

Run: ``.venv/bin/python -m bench.local_model [--json out.json]``. Each shard is a
spawned process pinned to one core (shard i to core i mod the cores this process
may use) running ``LlamaCppUpstream`` with the packaged Gemma 3 270M, as an
inference shard does; the parent plays the clients.

(a) Throughput: every shard generates ``--requests`` replies of ``--tokens``
tokens at once, with 1 shard and with 2; aggregate tokens/s is all tokens over
the wall time of the run, and 2/1 says how well a second core scales.

(b) Multi-turn TTFT: ``--sessions`` clients each hold a conversation of
``--turns`` turns (a shared system prompt, user turns of 30-60 tokens, replies of
``--reply-tokens``), one turn at a time, all clients at once. A turn goes to
``shard_for(session, N)`` (affinity, as the pipeline routes) or to a random shard
(the same seeded draw in every run). Session ids are picked so that affinity
spreads them evenly (``--unbalanced``: as they come). "service" TTFT is measured in the shard
from taking the request to the first token (prompt evaluation, which is what a
cached prefix saves); "e2e" adds the wait behind other requests on that shard.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing as mp
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from multiprocessing.queues import Queue
from typing import Any

from mpipeline.config import LlamaCppConfig
from mpipeline.messages import Assembled, PromptRequest, Turn
from mpipeline.routing import shard_for
from mpipeline.workers.base import Generation, WorkerContext

SYSTEM = (
    "You are a patient assistant for a small travel agency. Answer questions about "
    "trains, hotels, museums and food in the cities our customers visit, and keep "
    "every answer short and friendly."
)
WORDS = (
    "train hotel museum ticket morning evening river bridge market bread cheese coffee "
    "station platform delay window seat quiet room breakfast garden tower castle old "
    "new city street map walk bus tram price cheap late early family child dinner "
    "lunch fish soup wine rain sun cold warm open closed Sunday Monday guide tour"
).split()
THROUGHPUT_PROMPT = "Write a long, detailed story about a journey by train across Europe."
READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Request:
    session: str
    turn: int
    turns: list[tuple[str, str]]
    max_tokens: int
    sent: float  # parent's time.monotonic(); CLOCK_MONOTONIC is system-wide


@dataclass(frozen=True)
class Result:
    session: str
    turn: int
    shard: int
    text: str
    sent: float
    started: float
    first: float
    done: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


def _shard_main(
    shard: int, cpu: int, config: LlamaCppConfig, inbox: Queue[Any], results: Queue[Any]
) -> None:
    """Child: pin to ``cpu``, load the model, then serve ``inbox`` one request at a time."""
    from mpipeline.workers.llama_cpp import LlamaCppUpstream

    os.sched_setaffinity(0, {cpu})
    worker = LlamaCppUpstream(config, WorkerContext(shard=shard, cpus=(cpu,)))

    async def serve(req: Request) -> Result:
        turns = [Turn(role=role, content=text) for role, text in req.turns]
        prompt = PromptRequest(
            request_id=f"{req.session}-{req.turn}",
            session_id=req.session,
            input=turns[-1].content,
            max_tokens=req.max_tokens,
        )
        job = Assembled(request=prompt, prompt="", dedup_key="", messages=turns)
        gen = Generation()
        started = time.monotonic()
        first = 0.0
        pieces: list[str] = []
        async for piece in worker.generate(job, gen):
            first = first or time.monotonic()
            pieces.append(piece)
        done = time.monotonic()
        return Result(
            req.session, req.turn, shard, "".join(pieces), req.sent, started, first or done,
            done, gen.prompt_tokens, gen.cached_tokens, gen.completion_tokens,
        )  # fmt: skip

    with asyncio.Runner() as runner:
        runner.run(worker.start())
        results.put(("ready", shard))
        while (req := inbox.get()) is not None:
            results.put(runner.run(serve(req)))
        runner.run(worker.stop())


class Shards:
    """N spawned shard processes, each pinned to its own core (wrapping around)."""

    def __init__(self, n: int, config: LlamaCppConfig) -> None:
        ctx = mp.get_context("spawn")
        cores = sorted(os.sched_getaffinity(0))
        self.results: Queue[Any] = ctx.Queue()
        self.inboxes: list[Queue[Any]] = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(
                target=_shard_main,
                args=(i, cores[i % len(cores)], config, self.inboxes[i], self.results),
                daemon=True,
            )
            for i in range(n)
        ]
        for proc in self.procs:
            proc.start()
        for _ in range(n):
            kind, _shard = self.results.get(timeout=READY_TIMEOUT_S)
            assert kind == "ready"

    def send(self, shard: int, req: Request) -> None:
        self.inboxes[shard].put(req)

    def get(self) -> Result:
        result: Result = self.results.get(timeout=READY_TIMEOUT_S)
        return result

    def close(self) -> None:
        for inbox in self.inboxes:
            inbox.put(None)
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def throughput(n: int, args: argparse.Namespace, config: LlamaCppConfig) -> dict[str, float]:
    shards = Shards(n, config)
    try:
        turns = [("user", THROUGHPUT_PROMPT)]
        start = time.monotonic()
        for i in range(n):
            for r in range(args.requests):
                shards.send(i, Request(f"tp-{i}-{r}", 0, turns, args.tokens, time.monotonic()))
        results = [shards.get() for _ in range(n * args.requests)]
        wall = max(r.done for r in results) - start
    finally:
        shards.close()
    tokens = sum(r.completion_tokens for r in results)
    decode = [(r.completion_tokens - 1) / (r.done - r.first) for r in results if r.done > r.first]
    return {
        "shards": n,
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "decode_tok_s_per_shard": statistics.mean(decode),
    }


def conversations(args: argparse.Namespace) -> list[list[str]]:
    """The user turns of every session, the same in every run (seeded)."""
    rng = random.Random(args.seed)
    return [
        [
            f"Question {k + 1}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(24, 44)))
            for k in range(args.turns)
        ]
        for _ in range(args.sessions)
    ]


def session_ids(n: int, sessions: int, balanced: bool) -> list[str]:
    """Session ids; ``balanced``: ones that ``shard_for`` spreads evenly over ``n`` shards.

    Eight keys hashed onto two shards split 6/2 as often as not, and the crowded
    shard's queue would then decide the e2e numbers instead of the cache.
    """
    if not balanced:
        return [f"session-{s}" for s in range(sessions)]
    per_shard = -(-sessions // n)
    counts = [0] * n
    ids: list[str] = []
    for i in itertools.count():
        shard = shard_for(f"session-{i}", n)
        if counts[shard] < per_shard:
            counts[shard] += 1
            ids.append(f"session-{i}")
            if len(ids) == sessions:
                return ids
    raise AssertionError("unreachable")


def multi_turn(
    n: int, affinity: bool, args: argparse.Namespace, config: LlamaCppConfig
) -> list[Result]:
    users = conversations(args)
    ids = session_ids(n, args.sessions, not args.unbalanced)
    index = {sid: s for s, sid in enumerate(ids)}
    rng = random.Random(args.seed + n)
    route = {
        (s, k): shard_for(ids[s], n) if affinity else rng.randrange(n)
        for s in range(args.sessions)
        for k in range(args.turns)
    }
    history: list[list[tuple[str, str]]] = [[("system", SYSTEM)] for _ in users]
    shards = Shards(n, config)

    def send(s: int, k: int) -> None:
        history[s].append(("user", users[s][k]))
        req = Request(ids[s], k, list(history[s]), args.reply_tokens, time.monotonic())
        shards.send(route[s, k], req)

    results: list[Result] = []
    try:
        for s in range(args.sessions):
            send(s, 0)
        while len(results) < args.sessions * args.turns:
            result = shards.get()
            results.append(result)
            s = index[result.session]
            history[s].append(("assistant", result.text))
            if result.turn + 1 < args.turns:
                send(s, result.turn + 1)
    finally:
        shards.close()
    return results


@dataclass
class TurnStats:
    service_ms: float
    e2e_ms: float
    prompt_tokens: float
    cached_tokens: float


def per_turn(results: list[Result], turns: int) -> list[TurnStats]:
    out = []
    for k in range(turns):
        rs = [r for r in results if r.turn == k]
        out.append(
            TurnStats(
                service_ms=statistics.mean((r.first - r.started) * 1e3 for r in rs),
                e2e_ms=statistics.mean((r.first - r.sent) * 1e3 for r in rs),
                prompt_tokens=statistics.mean(r.prompt_tokens for r in rs),
                cached_tokens=statistics.mean(r.cached_tokens for r in rs),
            )
        )
    return out


@dataclass
class Report:
    throughput: list[dict[str, float]] = field(default_factory=list)
    ttft: dict[str, list[TurnStats]] = field(default_factory=dict)


def print_throughput(rows: list[dict[str, float]]) -> None:
    print("\n| shards | tokens | wall s | aggregate tok/s | decode tok/s per shard |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['shards']:.0f} | {row['tokens']:.0f} | {row['wall_s']:.2f} "
            f"| {row['aggregate_tok_s']:.1f} | {row['decode_tok_s_per_shard']:.1f} |"
        )
    if len(rows) == 2:
        ratio = rows[1]["aggregate_tok_s"] / rows[0]["aggregate_tok_s"]
        print(f"\n2-shard / 1-shard aggregate tokens/s: {ratio:.2f}")


def print_ttft(ttft: dict[str, list[TurnStats]], shard_counts: list[int], from_turn: int) -> None:
    for metric in ("service_ms", "e2e_ms"):
        head = "| turn | prompt tok |"
        rule = "| ---: | ---: |"
        for n in shard_counts:
            head += f" N={n} affinity | N={n} random | ratio | cached aff/rand |"
            rule += " ---: | ---: | ---: | ---: |"
        print(f"\nTTFT ({metric[:-3]}, ms, mean over sessions)\n{head}\n{rule}")
        turns = len(next(iter(ttft.values())))
        for k in range(turns):
            line = f"| {k + 1} | {ttft[f'{shard_counts[0]}-affinity'][k].prompt_tokens:.0f} |"
            for n in shard_counts:
                a, r = ttft[f"{n}-affinity"][k], ttft[f"{n}-random"][k]
                av, rv = getattr(a, metric), getattr(r, metric)
                line += f" {av:.0f} | {rv:.0f} | {rv / av:.2f} |"
                line += f" {a.cached_tokens:.0f}/{r.cached_tokens:.0f} |"
            print(line)
        for n in shard_counts:
            a = sum(getattr(t, metric) for t in ttft[f"{n}-affinity"][from_turn - 1 :])
            r = sum(getattr(t, metric) for t in ttft[f"{n}-random"][from_turn - 1 :])
            print(f"N={n}: random/affinity {metric[:-3]} TTFT from turn {from_turn}: {r / a:.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default="", help='GGUF; "": the packaged Gemma')
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--requests", type=int, default=3, help="(a) replies per shard")
    parser.add_argument("--tokens", type=int, default=64, help="(a) tokens per reply")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 4], help="(b) shard counts")
    parser.add_argument("--from-turn", type=int, default=4, help="(b) ratio over turns >= this")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--unbalanced", action="store_true", help="(b) session ids as they come, not spread evenly"
    )
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-ttft", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    config = LlamaCppConfig(model_path=args.model_path, n_ctx=args.n_ctx, n_threads=1)
    if not args.model_path:  # assemble the packaged GGUF once, before shards race to
        from mpipeline.workers.llama_cpp import packaged_model

        config = LlamaCppConfig(model_path=packaged_model(), n_ctx=args.n_ctx, n_threads=1)
    report = Report()
    began = time.monotonic()
    if not args.skip_throughput:
        report.throughput = [throughput(n, args, config) for n in (1, 2)]
        print_throughput(report.throughput)
    if not args.skip_ttft:
        for n in args.shards:
            for affinity in (True, False):
                results = multi_turn(n, affinity, args, config)
                mode = "affinity" if affinity else "random"
                report.ttft[f"{n}-{mode}"] = per_turn(results, args.turns)
        print_ttft(report.ttft, args.shards, args.from_turn)
    print(f"\n(cores {sorted(os.sched_getaffinity(0))}, {time.monotonic() - began:.0f} s in all)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "throughput": report.throughput,
                    "ttft": {k: [asdict(t) for t in v] for k, v in report.ttft.items()},
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()

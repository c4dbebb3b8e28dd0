"""``mpipeline bench --upstream`` without subprocesses: the fake upstream, the probe, the report.

The fake upstream is checked with the official ``openai`` SDK as its client,
the way a user would talk to an OpenAI-compatible server, so "compatible" is
tested by the thing it has to be compatible with.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import uvloop

from mpipeline.bench import fake_upstream as fake
from mpipeline.bench import upstream as bu
from mpipeline.bench import upstream_report as ur
from mpipeline.bench.load import Latency
from mpipeline.bench.report import machine
from mpipeline.bench.servers import free_port
from mpipeline.bench.upstream_probe import Sequential, chat_script, sequential
from mpipeline.bench.wrk import WRK_MARKER, WrkStats
from mpipeline.cli import main as cli_main


@pytest.fixture
def upstream() -> Iterator[int]:
    """A fake upstream (16 tokens, a 5 ms first token) on a loop of its own thread."""
    yield from _serve(fake.Settings(tokens=16, first_token_ms=5.0))


def _serve(settings: fake.Settings) -> Iterator[int]:
    port = free_port()
    ready = threading.Event()
    loop = uvloop.new_event_loop()
    stop = asyncio.Event()

    def run() -> None:
        async def main() -> None:
            task = asyncio.ensure_future(fake.serve("127.0.0.1", port, settings, stop))
            await asyncio.sleep(0.05)
            ready.set()
            await task

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)


def test_the_sdk_reads_a_whole_reply(upstream: int) -> None:
    with _client(upstream) as client:
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
    assert reply.choices[0].message.content == fake.TOKEN * 3
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 3


def test_the_sdk_reads_a_stream_with_usage(upstream: int) -> None:
    started = time.monotonic()
    with _client(upstream) as client:
        stream = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        with stream:
            chunks = list(stream)
    # Only a lower bound: the first token waits for its delay, never less.
    assert time.monotonic() - started >= 0.005
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == fake.TOKEN * 16
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_paced_stream_and_unknown_paths() -> None:
    for port in _serve(fake.Settings(tokens=4, token_delay_ms=1.0)):
        with _client(port) as client:
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            with stream:
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == fake.TOKEN * 4
            with pytest.raises(openai.NotFoundError):
                client.embeddings.create(model="m", input="x")


def test_probe_times_first_content_and_counts_tokens(upstream: int) -> None:
    ttfb = uvloop.run(sequential(upstream, "direct", requests=3, stream=True, max_tokens=5))
    assert ttfb.failed == 0 and ttfb.latency.samples == 3
    assert ttfb.tokens_min == ttfb.tokens_max == 5
    # The first content token waits for the 5 ms delay; the role chunk before it does not count.
    assert ttfb.latency.p50_us >= 5_000
    whole = uvloop.run(sequential(upstream, "direct", requests=3, stream=False, max_tokens=5))
    assert whole.failed == 0 and whole.kind == "latency"


def test_wrk_script_posts_unique_chat_bodies() -> None:
    script = chat_script(stream=True, max_tokens=64)
    assert '"max_tokens":64,"stream":true}' in script
    assert '{"model":"fake-model","messages":[{"role":"user","content":"' in script
    assert 'string.format("%02d%08d %s"' in script  # a thread id and counter per prompt
    assert WRK_MARKER in script


def test_pipeline_config_points_the_openai_worker_at_the_fake(tmp_path: Path) -> None:
    opts = bu.options(quick=True, cores=1)
    cfg = bu.pipeline_config(opts, [0], 8080, tmp_path, "http://127.0.0.1:9/v1")
    inference = cfg.stages.inference
    assert inference.worker == "openai"
    assert inference.openai.base_url == "http://127.0.0.1:9/v1"
    assert inference.openai.api_key_env == ""
    assert (inference.dedup.coalesce, inference.dedup.cache_entries) == (False, 0)
    on = bu.pipeline_config(bu.options(dedup=True, cores=1), [0], 8080, tmp_path, "http://x/v1")
    assert on.stages.inference.dedup.coalesce


def _wrk(requests: int) -> WrkStats:
    return WrkStats(
        requests=requests,
        duration_s=1.0,
        bytes=0,
        connect_errors=0,
        read_errors=0,
        write_errors=0,
        status_errors=0,
        timeouts=0,
        mean_us=1.0,
        stdev_us=0.0,
        p50_us=1.0,
        p90_us=1.0,
        p99_us=1.0,
        max_us=1.0,
    )


def _phase(mode: str, rps: int) -> ur.LoadPhase:
    return ur.LoadPhase(
        mode=mode,
        connections=32,
        throughput_rps=rps,
        tokens_per_s=rps * 64.0 if mode == "stream" else 0.0,
        wrk=_wrk(rps),
        cpu=[],
        cpu_us_per_request=1.0,
        upstream_cpu_us_per_request=1.0,
        loadgen_cpu_percent=1.0,
        foreign_cpu_percent=0.0,
    )


def _probe(kind: str, p50: float) -> Sequential:
    lat = Latency(samples=1, mean_us=p50, p50_us=p50, p95_us=p50, p99_us=p50, max_us=p50)
    return Sequential(kind=kind, target="x", failed=0, latency=lat)


def _run(system: str, workers: int, json_rps: int, stream_rps: int, p50: float) -> ur.UpstreamRun:
    return ur.UpstreamRun(
        system=system,
        workers=workers,
        start_command=[],
        phases=[_phase("json", json_rps), _phase("stream", stream_rps)],
        latency=_probe("latency", p50),
        ttfb=_probe("ttfb", p50 + 100),
    )


def test_verdicts_compare_with_the_two_worker_peer_and_the_direct_upstream() -> None:
    report = ur.UpstreamReport(
        machine=machine(),
        command=[],
        settings={"probe_requests": 1},
        direct_latency=_probe("latency", 100.0),
        direct_ttfb=_probe("ttfb", 150.0),
        runs=[
            _run(ur.PIPELINE, 1, 6_000, 400, 500.0),
            _run(ur.PEER, 1, 100, 100, 2_000.0),
            _run(ur.PEER, 2, 1_000, 200, 1_500.0),
        ],
        verdicts=[],
        leftovers=[],
    )
    got = {v.target: (v.measured, v.met) for v in ur.verdicts(report)}
    assert got == {
        "req/s JSON, all stages": (6_000, True),
        "x peer 2w, req/s JSON": (6.0, True),
        "x peer 2w, tokens/s": (2.0, False),
        "added p50 us, sequential": (400.0, True),
        "TTFB - upstream TTFT us": (450.0, True),
    }
    text = ur.table(report)
    assert "starlette+httpx 2w" in text and "json 6.00x, stream 2.00x" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--upstream", "--http"],
        ["bench", "--upstream", "--rates", "100"],
        ["bench", "--upstream", "--wrk-cpus", "0"],
        ["bench", "--streams", "10"],
        ["bench", "--dedup"],
    ],
)
def test_misused_flags_are_usage_errors(argv: list[str]) -> None:
    assert cli_main(argv) == 2

"""``mpipeline bench --http`` without processes: wrk's output, the probe client, the report."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop

from mpipeline.bench import http_report as hr
from mpipeline.bench import over_http as bh
from mpipeline.bench import probe as probe
from mpipeline.bench.report import machine
from mpipeline.bench.servers import GATEWAY, PEER, gateway_config
from mpipeline.bench.wrk import WRK_MARKER, WrkStats, parse_wrk, wrk_command, wrk_script
from mpipeline.cli import main as cli_main

# What wrk 4.1 prints with the bench's script: its own text, then done()'s line.
WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:18801/v1/prompt
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.15ms  465.69us   6.11ms   82.37%
    Req/Sec    13.98k     2.91k   17.47k    45.00%
  27823 requests in 2.00s, 11.15MB read
Requests/sec:  13909.09
Transfer/sec:      5.57MB

wrk-json {"requests":27823,"duration_us":2000347,"bytes":11691431,"connect":0,"read":1,\
"write":0,"status":3,"timeout":2,"mean":1149.7,"stdev":465.7,"p50":989,"p90":1602,\
"p99":2617,"max":6114}
"""


def test_parse_wrk_reads_the_done_line() -> None:
    stats = parse_wrk(WRK_OUTPUT)
    assert stats.requests == 27823
    assert stats.duration_s == pytest.approx(2.000347)
    assert stats.rps == pytest.approx(27823 / 2.000347)
    assert stats.bytes == 11691431
    assert (stats.p50_us, stats.p90_us, stats.p99_us, stats.max_us) == (989, 1602, 2617, 6114)
    assert stats.mean_us == pytest.approx(1149.7)
    assert stats.read_errors == 1
    assert stats.status_errors == 3
    assert stats.timeouts == 2
    assert stats.errors == 6


def test_parse_wrk_takes_the_last_result_line() -> None:
    first = WRK_OUTPUT.replace('"requests":27823', '"requests":1')
    stats = parse_wrk(first + WRK_OUTPUT)
    assert stats.requests == 27823


@pytest.mark.parametrize(
    "output",
    [
        "Running 1s test @ http://x/\n  0 requests in 1.00s\n",
        f"{WRK_MARKER}{{not json}}\n",
        f'{WRK_MARKER}{{"requests": 1}}\n',  # fields missing
    ],
)
def test_parse_wrk_refuses_output_without_a_good_result_line(output: str) -> None:
    with pytest.raises(ValueError, match="wrk"):
        parse_wrk(output)


def test_zero_duration_gives_zero_rate_not_a_crash() -> None:
    line = WRK_OUTPUT.splitlines()[-1].replace('"duration_us":2000347', '"duration_us":0')
    assert parse_wrk(line).rps == 0.0


def test_wrk_script_posts_unique_prompts_and_prints_json() -> None:
    body = "lorem ipsum dolor"
    plain = wrk_script(body, stream=False)
    assert f"[==[{body}]==]" in plain
    assert '"stream":true' not in plain
    assert 'wrk.method = "POST"' in plain
    assert "function done(" in plain and WRK_MARKER in plain
    # 11-byte prefix: 2-digit thread id, 8-digit counter, a space (as bench.load's prompts).
    assert '"%02d%08d %s"' in plain
    streaming = wrk_script(body, stream=True, max_tokens=1)
    assert '"stream":true,"max_tokens":1' in streaming


@pytest.mark.parametrize("body", ['say "hi"', "back\\slash", "x]==]y"])
def test_wrk_script_refuses_bodies_that_need_escaping(body: str) -> None:
    with pytest.raises(ValueError, match="escaping"):
        wrk_script(body, stream=False)


def test_wrk_command_keeps_at_least_one_connection_per_thread() -> None:
    cmd = wrk_command("http://h/p", Path("s.lua"), threads=4, connections=2, duration_s=3)
    assert cmd[:4] == ["wrk", "-t4", "-c4", "-d3s"]
    assert cmd[-1] == "http://h/p"


def test_options_round_durations_up_to_whole_seconds() -> None:
    assert bh.options(duration_s=2.2).duration_s == 3
    assert bh.options(duration_s=0.1).duration_s == 1
    quick = bh.options(quick=True)
    assert quick.duration_s == bh.QUICK_DURATION_S
    assert quick.ttfb_requests == bh.QUICK_TTFB_REQUESTS
    assert bh.options().duration_s == bh.DEFAULT_DURATION_S
    cmd = bh.command_line(bh.options(cores=(1, 2), duration_s=10, wrk_cpus=(1,), peer=False))
    assert cmd[:3] == ["mpipeline", "bench", "--http"]
    assert "--no-baseline" in cmd
    assert cmd[cmd.index("--wrk-cpus") + 1] == "1"


def test_gateway_config_serves_http_on_the_cores_with_the_delay(tmp_path: Path) -> None:
    cfg = gateway_config([0, 1], 18000, tmp_path, token_delay_ms=20.0)
    assert cfg.gateway.port == 18000
    assert cfg.gateway.cpus == [0, 1]
    assert cfg.gateway.cores_per_replica == 2
    assert cfg.stages.inference.replicas == 2
    assert cfg.stages.inference.echo.token_delay_ms == 20.0
    assert cfg.run_dir == str(tmp_path)
    assert not cfg.metrics.enabled


# The probe client, against a scripted server


class _Scripted:
    """A one-connection server that answers with ``answer``, pausing at each ``|``."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.done = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        await self.done.wait()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            for part in self.answer.split(b"|"):
                writer.write(part)
                await writer.drain()
                await asyncio.sleep(0.02)
        finally:
            writer.close()
            await writer.wait_closed()
            self.done.set()


def _send(answer: bytes) -> probe._Answer | None:
    async def go() -> probe._Answer | None:
        async with _Scripted(answer) as port:
            conn = await probe._Conn.open(port)
            t0, got, conn = await probe._exchange(conn, port, b'{"input":"x"}')
            await conn.close()
        assert got is None or got.end_ns >= t0
        return got

    return uvloop.run(go())


def test_probe_client_times_the_first_data_line_not_the_keepalive_comment() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    comment = b": keep-alive\n\n"
    event = b"event: chunk\ndata: {}\n\n"
    answer = head + b"%x\r\n%b\r\n" % (len(comment), comment)
    answer += b"|%x\r\n%b\r\n" % (len(event), event)
    answer += b"|0\r\n\r\n"
    got = _send(answer)
    assert got is not None
    assert got.status == 200
    assert got.first_data_ns is not None
    # The data came one scripted pause after the comment, and the end one more.
    assert got.end_ns - got.first_data_ns >= 15_000_000


def test_probe_client_reads_a_content_length_body() -> None:
    got = _send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\n\r\n|{}")
    assert got is not None
    assert got.status == 503
    assert got.first_data_ns is None


def test_a_dead_connection_counts_as_a_failure_not_an_exception() -> None:
    assert _send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort") is None


# The report


def _phase(mode: str, rps: float) -> hr.LoadPhase:
    stats = WrkStats(
        requests=int(rps),
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
    return hr.LoadPhase(
        mode=mode,
        connections=64,
        threads=2,
        throughput_rps=rps,
        wrk=stats,
        cpu=[],
        cpu_us_per_request=10.0,
        loadgen_cpu_percent=20.0,
        foreign_cpu_percent=0.0,
    )


def _run(system: str, cores: int, rps: float, p50_us: float, ttfb_extra_us: float) -> hr.HttpRun:
    latency = probe.Probe(
        kind="latency",
        offered_rps=200.0,
        samples=10,
        failed=0,
        mean_us=p50_us,
        p50_us=p50_us,
        p99_us=p50_us,
        max_us=p50_us,
    )
    ttfb = probe.Probe(
        kind="ttfb",
        offered_rps=None,
        samples=10,
        failed=0,
        mean_us=20_000 + ttfb_extra_us,
        p50_us=20_000 + ttfb_extra_us,
        p99_us=20_000 + ttfb_extra_us,
        max_us=20_000 + ttfb_extra_us,
        subtract_us=20_000.0,
        extra_p50_us=ttfb_extra_us,
        extra_p99_us=ttfb_extra_us,
    )
    return hr.HttpRun(
        system=system,
        cores=cores,
        cpus=list(range(cores)),
        loadgen_cpus=list(range(cores)),
        start_command=["x"],
        phases=[_phase("json", rps), _phase("stream", rps / 10)],
        latency=latency,
        ttfb=ttfb,
    )


def test_verdicts_judge_the_gateway_on_two_cores_against_the_peer() -> None:
    runs = [
        _run(GATEWAY, 1, 30_000, 300, 500),
        _run(PEER, 1, 10_000, 200, 400),
        _run(GATEWAY, 2, 16_000, 500, 800),
        _run(PEER, 2, 10_000, 200, 400),
    ]
    got = {v.target: (v.measured, v.met) for v in hr.verdicts(runs)}
    assert got["req/s JSON, 2 cores"] == (16_000, True)
    ratio, met = got["x peer, JSON, 2 cores"]
    assert ratio == pytest.approx(1.6)
    assert met
    assert got["p50 us, low load"] == (500, False)
    assert got["TTFB - TTFT p50 us"] == (800, True)
    assert hr.ratio(runs, 1, "stream") == pytest.approx(3.0)
    assert hr.verdicts(runs[:2]) == []  # no 2-core row, nothing to judge

    report = hr.HttpReport(
        machine=machine(),
        command=["mpipeline", "bench", "--http"],
        settings={"probe_rate": 200.0, "token_delay_ms": 20.0},
        runs=runs,
        skipped_cores=[],
        verdicts=hr.verdicts(runs),
        leftovers=["gateway: process 1 outlived its parent"],
    )
    text = hr.table(report)
    assert "2c json 1.60x" in text
    assert "MISSED" in text
    assert "left behind" in text


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--http", "--rates", "100"],
        ["bench", "--http", "--requests", "10"],
        ["bench", "--http", "--shared-cores"],
        ["bench", "--connections", "8"],
        ["bench", "--wrk-cpus", "0"],
    ],
)
def test_cli_refuses_options_that_do_not_go_with_http_or_without_it(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(args) == 2
    assert "--http" in capsys.readouterr().err


def test_the_chained_gateway_runs_the_whole_flow_per_core_and_repeats_its_command(
    tmp_path: Path,
) -> None:
    cfg = gateway_config([0, 1], 8123, tmp_path, layout="chained")
    assert {cfg.stages.rag.group, cfg.stages.stream.group} == {"chain"}
    assert cfg.stages.assemble.replicas == 2 and cfg.gateway.port == 8123
    assert gateway_config([0, 1], 8123, tmp_path).stages.rag.group == ""
    opts = bh.options(layouts=("per-stage", "chained"))
    assert bh.command_line(opts)[-2:] == ["--layout", "per-stage,chained"]


@pytest.mark.parametrize("value", ["chain", "chained,chained", ""])
def test_a_bad_layout_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(["bench", "--layout", value])
    assert info.value.code == 2
    assert "per-stage, chained" in capsys.readouterr().err

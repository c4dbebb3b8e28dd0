"""``mpipeline top`` driven through Textual's test harness with a scripted source.

The source is a fake that makes a new frame per call, counters growing, so the
tests see what a person sees (keys pressed, the screen read back as text)
without a pipeline. ``--once`` and the command line are checked here too.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from textual.pilot import Pilot
from textual.widgets import Sparkline

from mpipeline.cli import main as cli_main
from mpipeline.errors import ExitCode
from mpipeline.metrics.snapshot import (
    CircuitStatus,
    EdgeStatus,
    ReplicaStatus,
    RingCounters,
    Status,
)
from mpipeline.metrics.view import Frame
from mpipeline.ops import top
from mpipeline.ops._top_render import bar, sparkline
from mpipeline.ops.top import HelpScreen, TopApp
from tests._screen import screen_text

STAGES = ("gateway", "rag", "assemble", "inference", "post", "stream")
SIZE = (120, 60)
# Long enough that the timer never fires during a test that ticks by hand.
MANUAL = 3600.0
PROBLEM = "no supervisor is running in /tmp/nowhere (no state.json)"


def _replicas(n: int) -> list[ReplicaStatus]:
    out = []
    for slot, stage in enumerate(STAGES):
        out.append(
            ReplicaStatus(
                name=f"{stage}-0",
                stage=stage,
                index=0,
                slot=slot,
                pid=1000 + slot,
                cpus=[slot % 2],
                state="READY",
                processed=100 * n,
                in_flight=1,
                heartbeat_age_s=0.1,
                restarts=0,
                generation=1,
                last_exit=None,
            )
        )
    return out


def _families(n: int) -> list[Metric]:
    errors = CounterMetricFamily("mpipeline_errors", "", labels=["stage", "code"])
    errors.add_metric(["inference", "upstream_timeout"], 3 * n)
    cpu = CounterMetricFamily("mpipeline_process_cpu_seconds", "", labels=["stage", "replica"])
    for stage in STAGES:
        cpu.add_metric([stage, f"{stage}-0"], 0.25 * n)
    hist = HistogramMetricFamily(
        "mpipeline_stage_duration_seconds", "", labels=["stage", "replica"]
    )
    hist.add_metric(["rag", "rag-0"], [("0.001", 10.0 * n), ("+Inf", 10.0 * n)], 0.0)
    return [errors, cpu, hist]


def _status(n: int) -> Status:
    ring = RingCounters(512, 10 * n, 9 * n, 768, 0, 0, False, 1, 2)
    edge = EdgeStatus("mpl-r-rag0-assemble0", "rag0", "assemble0", 1024, ring, None)
    circuit = CircuitStatus("openai", "open", 5, 10, 6, 2, 4.0, 0.0)
    return Status(
        run_dir="/tmp/run",
        run_id="feedbeef",
        config="p.toml",
        state="RUNNING",
        supervisor_pid=42,
        uptime_s=65.0,
        replicas=_replicas(n),
        edges=[edge],
        gateway_url="http://127.0.0.1:8080",
        circuits=[circuit],
    )


class FakeSource:
    """A run whose counters grow by one step per read; can pretend to be down."""

    def __init__(self) -> None:
        self.calls = 0
        self.down = False

    def __call__(self) -> Frame:
        self.calls += 1
        n = self.calls
        if self.down:
            return Frame(float(n), 1e9 + n, None, problem=PROBLEM)
        return Frame(float(n), 1e9 + n, _status(n), _families(n))


Scenario = Callable[[TopApp, Pilot[None], FakeSource], Awaitable[None]]


def drive(scenario: Scenario, interval: float = MANUAL, source: FakeSource | None = None) -> None:
    async def go() -> None:
        src = source or FakeSource()
        app = TopApp(src, interval=interval, run_dir=Path("/tmp/run"))
        async with app.run_test(size=SIZE) as pilot:
            await scenario(app, pilot, src)

    asyncio.run(go())


async def tick(app: TopApp, pilot: Pilot[None], times: int = 1) -> None:
    for _ in range(times):
        app.tick()
    await pilot.pause()


def test_the_screen_shows_flow_rings_circuits_cpu_and_errors() -> None:
    async def scenario(app: TopApp, pilot: Pilot[None], src: FakeSource) -> None:
        await tick(app, pilot)  # the second frame: rates exist now
        text = screen_text(app)
        assert "run feedbeef  RUNNING  up 1m05s" in text
        assert "gateway http://127.0.0.1:8080" in text
        assert "gateway ×1 ─▶ rag ×1 ─▶ assemble ×1 ─▶ inference ×1 ─▶ post ×1 ─▶ stream ×1" in text
        for stage in STAGES:
            assert f"  {stage}-0 " in text
        rag = next(line for line in text.splitlines() if "  rag-0 " in line)
        assert rag.split()[2:6] == ["READY", "1", "100", "1"]
        assert "rag0 → assemble0" in text
        assert bar(0.5, mark=0.75) in text and "50%" in text
        assert "openai" in text and "open (probe in 4.0s)" in text
        assert "cpu0" in text and "cpu1" in text
        assert "inference  upstream_timeout  ×3" in text
        assert app.query_one("#spark", Sparkline).data == [100.0]

    drive(scenario)


def test_q_quits() -> None:
    async def scenario(app: TopApp, pilot: Pilot[None], src: FakeSource) -> None:
        await pilot.press("q")
        await pilot.pause()
        assert app.return_code == 0
        assert not app.is_running

    drive(scenario)


def test_p_pauses_refreshing_and_resumes_it() -> None:
    async def scenario(app: TopApp, pilot: Pilot[None], src: FakeSource) -> None:
        await pilot.pause(0.2)
        assert src.calls >= 2
        await pilot.press("p")
        calls = src.calls
        await pilot.pause(0.3)
        assert src.calls == calls  # not read while paused
        assert "PAUSED" in screen_text(app)
        await pilot.press("p")
        assert src.calls > calls  # a fresh frame at once, then the timer's
        await pilot.pause(0.2)
        assert src.calls > calls + 1
        assert "PAUSED" not in screen_text(app)

    drive(scenario, interval=0.05)


def test_r_resets_the_sparkline_errors_and_baselines() -> None:
    async def scenario(app: TopApp, pilot: Pilot[None], src: FakeSource) -> None:
        await tick(app, pilot, 3)
        spark = app.query_one("#spark", Sparkline)
        assert spark.data == [100.0, 100.0, 100.0]
        assert len(app.view.errors) == 3
        await pilot.press("r")
        assert spark.data == []  # the reset read has no baseline to rate against
        assert not app.view.errors and app.view.requests_per_s is None
        assert "no errors since the start (or the last reset)" in screen_text(app)
        await tick(app, pilot)
        assert spark.data == [100.0]

    drive(scenario)


def test_h_shows_and_hides_the_help() -> None:
    async def scenario(app: TopApp, pilot: Pilot[None], src: FakeSource) -> None:
        await pilot.press("h")
        assert isinstance(app.screen, HelpScreen)
        assert "p  pause / resume refreshing" in screen_text(app)
        await pilot.press("h")
        assert not isinstance(app.screen, HelpScreen)
        assert "pause / resume refreshing" not in screen_text(app)

    drive(scenario)


def test_a_missing_supervisor_is_shown_and_retried_until_it_is_back() -> None:
    src = FakeSource()
    src.down = True

    async def scenario(app: TopApp, pilot: Pilot[None], src: FakeSource) -> None:
        text = screen_text(app)
        assert PROBLEM in text and "retrying every" in text
        assert "rag0 → assemble0" not in text
        src.down = False
        await tick(app, pilot)
        text = screen_text(app)
        assert PROBLEM not in text and "run feedbeef" in text and "rag0 → assemble0" in text

    drive(scenario, source=src)


# The text helpers


def test_bar_fills_by_eighths_and_marks_the_high_water() -> None:
    assert bar(0.5, 10, 0.8) == "█████···│·"
    assert bar(0.0, 4) == "····"
    assert bar(1.0, 4, 1.0) == "████"
    assert bar(0.05, 10) == "▌·········"
    assert bar(2.0, 3) == "███"


def test_sparkline_scales_to_the_largest_value() -> None:
    assert sparkline([0, 5, 10], 10) == "▁▄█"
    assert sparkline([1, 2, 3, 4], 2) == "▆█"
    assert sparkline([0, 0], 5) == "▁▁"


# --once and the command line


def test_once_prints_every_panel_from_two_reads() -> None:
    src = FakeSource()
    out, err = io.StringIO(), io.StringIO()
    assert top._once(src, Path("/tmp/run"), 0.0, out, err) == ExitCode.OK
    text = out.getvalue()
    assert src.calls == 2
    assert text.startswith("mpipeline top  run feedbeef  RUNNING")
    for title in ("pipeline", "rings", "throughput", "CPU per core", "circuits", "recent errors"):
        assert f"{title} ─" in text or f"{title} (" in text
    assert "now 100 " in text and "inference  upstream_timeout  ×3" in text
    assert err.getvalue() == ""


def test_once_without_a_supervisor_exits_1_naming_why() -> None:
    src = FakeSource()
    src.down = True
    out, err = io.StringIO(), io.StringIO()
    assert top._once(src, Path("/tmp/run"), 0.0, out, err) == ExitCode.FAILURE
    assert err.getvalue() == f"mpipeline top: {PROBLEM}\n" and out.getvalue() == ""


def test_run_source_without_a_run_returns_a_frame_that_says_so(tmp_path: Path) -> None:
    source = top.RunSource(tmp_path / "absent")
    try:
        got = source()
    finally:
        source.close()
    assert got.status is None and got.problem is not None
    assert got.problem.startswith(f"no supervisor is running in {tmp_path / 'absent'}")


def test_cli_top_once_without_a_run_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main(["top", "--once", "--interval", "0.05", "--run-dir", str(tmp_path)])
    assert code == ExitCode.FAILURE
    assert "mpipeline top: no supervisor is running in" in capsys.readouterr().err


def test_cli_top_rejects_a_tiny_interval_and_a_missing_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["top", "--interval", "0.001", "--run-dir", str(tmp_path)]) == ExitCode.USAGE
    assert "--interval must be at least" in capsys.readouterr().err
    assert cli_main(["top", "--run-dir", str(tmp_path)]) == ExitCode.USAGE  # stdin is not a tty
    assert "needs a terminal; use --once" in capsys.readouterr().err

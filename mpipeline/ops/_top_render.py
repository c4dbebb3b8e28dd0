"""How ``mpipeline top`` draws a ``View``: Rich renderables, one per panel.

Kept apart from the Textual app so that ``top --once`` prints exactly the
panels the live screen shows, as plain text, without starting an app or
needing a terminal.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from mpipeline.metrics.view import CoreView, RingView, StageView, View
from mpipeline.ops.status import format_bytes, format_cpus, format_duration

BAR_WIDTH = 20
# Eighths of a cell, so a bar moves before a whole cell fills.
PARTIAL = " ▏▎▍▌▋▊▉"
FULL, TRACK, HIGH_WATER = "█", "·", "│"
SPARK = "▁▂▃▄▅▆▇█"
# Ring fill and core load above these turn yellow, then red.
WARN, ALARM = 0.5, 0.8
CIRCUIT_STYLES = {"closed": "green", "half_open": "yellow", "open": "bold red"}
HELP = """\
mpipeline top: the running pipeline, refreshed every interval.

  q  quit
  p  pause / resume refreshing (the screen keeps the last frame)
  r  reset: clear the sparkline, the error tail and the rate baselines
  h  show / hide this help

Rates, latencies and CPU are over the last interval: msg/s is messages a
stage handled per second (gateway: requests answered), p50/p95 the time in
the stage's handler (gateway: whole requests), CPU % is per replica (100 =
one core) and per pinned core. Ring bars show bytes in use; │ marks the
ring's high-water mark. Dedup savings: answers given without their own
upstream call (coalesced or cached) over all answers that needed one.
"""


def bar(fraction: float, width: int = BAR_WIDTH, mark: float | None = None) -> str:
    """A text bar ``width`` cells wide, filled to ``fraction``; ``mark`` draws │ where it falls."""
    fraction = min(max(fraction, 0.0), 1.0)
    full, part = divmod(round(fraction * width * 8), 8)
    cells = [FULL] * full + ([PARTIAL[part]] if part and full < width else [])
    cells += [TRACK] * (width - len(cells))
    if mark is not None:
        at = min(width - 1, int(min(max(mark, 0.0), 1.0) * width))
        if cells[at] == TRACK:  # the high-water mark is never below the fill
            cells[at] = HIGH_WATER
    return "".join(cells)


def sparkline(values: Sequence[float], width: int) -> str:
    """The last ``width`` values as block characters, scaled to the largest."""
    values = list(values)[-width:]
    top = max(values, default=0.0)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f}µs"
    if s < 1:
        return f"{s * 1e3:.1f}ms"
    return f"{s:.2f}s"


def rate(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.1f}" if r < 100 else f"{r:,.0f}"


def percent(p: float | None) -> str:
    return "-" if p is None else f"{p:.0f}%"


def _level(fraction: float) -> str:
    return "red" if fraction >= ALARM else "yellow" if fraction >= WARN else "green"


# Panels


def header(view: View, run_dir: Path | None, interval: float, paused: bool) -> Text:
    text = Text("mpipeline top", style="bold")
    s = view.status
    if s is None:
        text.append(f"  {view.problem or 'no data yet'}", style="yellow")
        if not paused:
            text.append(f"  (retrying every {interval:g}s)")
    else:
        text.append(f"  run {s.run_id}  ")
        text.append(s.state, style="green" if s.state == "RUNNING" else "yellow")
        text.append(f"  up {format_duration(s.uptime_s)}  supervisor pid {s.supervisor_pid}")
        if s.gateway_url:
            text.append(f"  gateway {s.gateway_url}")
        text.append(f"\nrun dir {s.run_dir}")
    if run_dir is not None and s is None:
        text.append(f"\nrun dir {run_dir}")
    text.append(f"  every {interval:g}s")
    if paused:
        text.append("  PAUSED", style="bold reverse")
    return text


def flow(view: View) -> RenderableType:
    """The stages in request order, then a row per stage and per replica."""
    line = Text()
    for i, st in enumerate(view.stages):
        if i:
            line.append(" ─▶ ", style="dim")
        line.append(st.stage, style="bold")
        line.append(f" ×{len(st.replicas)}")
    table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    for name, right in (
        ("STAGE / REPLICA", False),
        ("STATE", False),
        ("CPUS", False),
        ("MSG/S", True),
        ("P50", True),
        ("P95", True),
        ("IN FLIGHT", True),
        ("RESTARTS", True),
        ("CPU", True),
    ):
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for st in view.stages:
        _stage_rows(table, st)
    return Group(line, table)


def _stage_rows(table: Table, st: StageView) -> None:
    ready = f"{st.ready}/{len(st.replicas)} ready"
    cpu = [r.cpu_percent for r in st.replicas if r.cpu_percent is not None]
    table.add_row(
        Text(st.stage, style="bold"),
        Text(ready, style="green" if st.ready == len(st.replicas) else "yellow"),
        "",
        rate(st.per_s),
        seconds(st.p50_s),
        seconds(st.p95_s),
        str(sum(r.in_flight for r in st.replicas)),
        str(sum(r.restarts for r in st.replicas)),
        percent(sum(cpu)) if cpu else "-",
    )
    for r in st.replicas:
        table.add_row(
            f"  {r.name}",
            Text(r.state, style="" if r.state == "READY" else "yellow"),
            format_cpus(list(r.cpus)),
            rate(r.per_s),
            "",
            "",
            str(r.in_flight),
            str(r.restarts),
            percent(r.cpu_percent),
            style="dim" if r.state != "READY" else "",
        )


def rings(view: View, width: int = BAR_WIDTH) -> RenderableType:
    """A bar per flow ring; the error-return rings only when one holds something."""
    if not view.rings:
        return Text("no rings", style="dim")
    table = Table(box=None, pad_edge=False, show_header=False, expand=False)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(no_wrap=True)
    quiet = [r for r in view.rings if r.failures and not r.used and r.error is None]
    for r in view.rings:
        if r not in quiet:
            table.add_row(r.name, *_ring_cells(r, width))
    if not quiet:
        return table
    high = max(r.high_water for r in quiet)
    note = f"+ {len(quiet)} error-return rings, empty (highest high-water {format_bytes(high)})"
    return Group(table, Text(note, style="dim"))


def _ring_cells(r: RingView, width: int) -> tuple[Text, str, str]:
    if r.error is not None:
        return Text(TRACK * width, style="dim"), "-", r.error
    cells = Text(bar(r.fill, width, r.high_fill), style=_level(r.fill))
    used = f"{100 * r.fill:.0f}%"
    high = format_bytes(r.high_water)
    detail = f"{format_bytes(r.used)} / {format_bytes(r.capacity)}  high {high}"
    if r.poisoned:
        detail += "  POISONED"
    return cells, used, detail


def throughput(view: View, spark_width: int | None = None) -> Text:
    """Requests/s now and at peak; ``spark_width`` adds a text sparkline (for --once)."""
    text = Text("now ")
    text.append(rate(view.requests_per_s), style="bold")
    if len(view.history) > 1:
        text.append(f"  peak {rate(max(view.history))} over the last {len(view.history)}")
    if view.tokens_per_s is not None:
        t_in, t_out = view.tokens_per_s
        text.append(f"  tokens/s in {rate(t_in)} out {rate(t_out)}")
    if spark_width and len(view.history) > 1:
        text.append("\n" + sparkline(view.history, spark_width), style="cyan")
    return text


def circuits(view: View) -> RenderableType:
    if not view.circuits:
        return Text("no upstream circuits (the worker calls no remote upstream)", style="dim")
    table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    for name in ("UPSTREAM", "STATE", "FAILED/CALLS", "OPENED"):
        table.add_column(name, no_wrap=True)
    for c in view.circuits:
        state = Text(c.state, style=CIRCUIT_STYLES.get(c.state, "bold red"))
        if c.state == "open" and c.retry_in_s:
            state.append(f" (probe in {format_duration(c.retry_in_s)})")
        window = f"{c.window_failures}/{c.window_calls}"
        table.add_row(c.upstream, state, window, f"{c.opens}x")
    return table


def dedup(view: View) -> Text:
    d = view.dedup
    if d is None:
        return Text("dedup savings -", style="dim")
    text = Text("dedup savings ")
    text.append(percent(None if d.savings is None else 100 * d.savings), style="bold")
    text.append(f"  ({rate(d.hits_per_s)} hits/s, {rate(d.calls_per_s)} upstream calls/s)")
    total = None if d.total_savings is None else 100 * d.total_savings
    text.append(f"\nsince start {percent(total)}")
    return text


def cores(view: View, width: int = BAR_WIDTH) -> RenderableType:
    if not view.cores:
        return Text("CPU per core: waiting for a second frame", style="dim")
    table = Table(box=None, pad_edge=False, show_header=False, expand=False)
    for _ in range(4):
        table.add_column(no_wrap=True)
    for c in view.cores:
        table.add_row(*_core_cells(c, width))
    return table


def _core_cells(c: CoreView, width: int) -> tuple[str, Text, str, str]:
    load = c.percent / 100
    return (
        f"cpu{c.cpu}",
        Text(bar(load, width), style=_level(load)),
        f"{c.percent:4.0f}%",
        " ".join(c.replicas),
    )


def errors(view: View, rows: int | None = None) -> RenderableType:
    """The newest error lines, oldest first, as ``tail`` shows them."""
    lines = view.errors[-rows:] if rows else view.errors
    if not lines:
        return Text("no errors since the start (or the last reset)", style="dim")
    table = Table(box=None, pad_edge=False, show_header=False, expand=False)
    for _ in range(4):
        table.add_column(no_wrap=True)
    for e in lines:
        at = time.strftime("%H:%M:%S", time.localtime(e.wall))
        table.add_row(at, e.stage, Text(e.code, style="red"), f"×{e.count}")
    return table


def render_text(view: View, *, run_dir: Path | None, interval: float, width: int) -> str:
    """Every panel one after the other as plain text: ``mpipeline top --once``."""
    console = Console(
        file=io.StringIO(),
        width=width,
        color_system=None,
        force_terminal=False,
        legacy_windows=False,
        emoji=False,
        highlight=False,
    )
    console.print(header(view, run_dir, interval, paused=False))
    if view.status is not None:
        sections: list[tuple[str, RenderableType]] = [
            ("pipeline", flow(view)),
            ("rings (bytes in use, │ high-water)", rings(view)),
            ("throughput (requests/s)", throughput(view, spark_width=min(60, width))),
            ("CPU per core (pinned replicas)", cores(view)),
            ("circuits", circuits(view)),
            ("dedup", dedup(view)),
            ("recent errors", errors(view, rows=10)),
        ]
        for title, body in sections:
            console.rule(title, align="left", characters="─")
            console.print(body)
    out = console.file
    assert isinstance(out, io.StringIO)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines()) + "\n"

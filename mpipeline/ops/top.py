"""``mpipeline top``: a live terminal dashboard of a running pipeline.

It reads what ``mpipeline status`` and ``/metrics`` read (the run's state
file, control block, ring headers, breaker board and metrics block, through
``status`` and ``metrics.collect``), so it needs no HTTP endpoint, works with
the metrics server off, and can never change what the pipeline does. A
``source`` callable produces one ``Frame`` per refresh; ``metrics.view`` turns
consecutive frames into rates (the web dashboard uses the same model); this
module only draws them. Tests drive the app with a fake source through
Textual's own harness.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TextIO

from rich.console import RenderableType
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Sparkline, Static

from mpipeline import rundir
from mpipeline.errors import ConfigError, ExitCode, MPipelineError
from mpipeline.metrics.collect import Reader
from mpipeline.metrics.snapshot import snapshot
from mpipeline.metrics.view import Frame, Model, View
from mpipeline.ops import _top_render as draw

DEFAULT_INTERVAL_S = 1.0
# Fewer than this many seconds between reads would cost more than it shows.
MIN_INTERVAL_S = 0.05
ERROR_ROWS = 8
ONCE_WIDTH = 100

Source = Callable[[], Frame]


class RunSource:
    """Reads the run in ``run_dir`` once per call; a missing run is a frame, not an error.

    Each call connects afresh, so a run that stops and a new one that starts in
    the same directory are both followed. The metrics ``Reader`` is kept: it
    holds the metrics block and the replicas' psutil handles between calls.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._reader = Reader()

    def __call__(self) -> Frame:
        at, wall = time.monotonic(), time.time()
        try:
            with rundir.connect(self.run_dir) as run:
                snap = snapshot(run)
                families = self._reader.collect(run)
        except (MPipelineError, OSError) as exc:
            # The run may vanish between two reads: say so and try again next time.
            return Frame(at, wall, None, problem=str(exc))
        return Frame(at, wall, snap, families)

    def close(self) -> None:
        self._reader.close()


class HelpScreen(ModalScreen[None]):
    """The key list and what the numbers mean, over the dashboard."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static {
        width: 84; height: auto; padding: 1 2;
        border: round $accent; background: $surface;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("h", "app.pop_screen", "Close help"),
        Binding("escape", "app.pop_screen", "Close help", show=False),
        Binding("q", "app.quit", "Quit"),
    ]

    def compose(self) -> ComposeResult:
        yield Static(draw.HELP, id="help")


class TopApp(App[None]):
    """The dashboard: refreshes from ``source`` every ``interval`` seconds unless paused."""

    TITLE = "mpipeline top"
    ENABLE_COMMAND_PALETTE = False  # four keys; a palette would only hide them
    CSS = """
    #header { height: auto; padding: 0 1; background: $boost; }
    .panel { height: auto; border: round $primary 50%; border-title-color: $text; }
    #lower { height: auto; }
    #lower > .panel { width: 1fr; }
    #spark { height: 2; margin-top: 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("p", "pause", "Pause/resume"),
        Binding("r", "reset", "Reset"),
        Binding("h", "help", "Help"),
    ]

    def __init__(
        self, source: Source, *, interval: float = DEFAULT_INTERVAL_S, run_dir: Path | None = None
    ) -> None:
        super().__init__()
        self.source = source
        self.interval = interval
        self.run_dir = run_dir
        self.model = Model()
        self.paused = False
        self.view = View(None, "reading the run...")

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        with VerticalScroll(id="body"):
            yield Static(id="flow", classes="panel")
            yield Static(id="rings", classes="panel")
            with Vertical(id="traffic", classes="panel"):
                yield Static(id="throughput")
                yield Sparkline([], id="spark")
            yield Static(id="cores", classes="panel")
            with Horizontal(id="lower"):
                yield Static(id="circuits", classes="panel")
                yield Static(id="dedup", classes="panel")
            yield Static(id="errors", classes="panel")
        yield Footer()

    def on_mount(self) -> None:
        titles = {
            "flow": "pipeline",
            "rings": "rings (bytes in use, │ high-water)",
            "cores": "CPU per core (pinned replicas)",
            "traffic": "throughput (requests/s)",
            "circuits": "circuits",
            "dedup": "dedup",
            "errors": "recent errors",
        }
        for wid, title in titles.items():
            self.query_one(f"#{wid}").border_title = title
        self.tick()
        self.set_interval(self.interval, self.tick)

    def tick(self) -> None:
        """One refresh: read a frame (unless paused) and redraw.

        The read runs on the event loop: it takes a few milliseconds (a dozen
        small segments attached and closed), less than a thread hand-off would
        make worth its complexity, and it keeps refreshes strictly in order.
        """
        if self.paused:
            return
        self.view = self.model.update(self.source())
        self.draw()

    def draw(self) -> None:
        view = self.view
        self._put("header", draw.header(view, self.run_dir, self.interval, self.paused))
        self._put("flow", draw.flow(view))
        self._put("rings", draw.rings(view))
        self._put("cores", draw.cores(view))
        self._put("throughput", draw.throughput(view))
        self._put("circuits", draw.circuits(view))
        self._put("dedup", draw.dedup(view))
        self._put("errors", draw.errors(view, ERROR_ROWS))
        self.query_one("#spark", Sparkline).data = list(view.history)
        self.query_one("#body").display = view.status is not None

    def _put(self, wid: str, content: RenderableType) -> None:
        self.query_one(f"#{wid}", Static).update(content)

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused:
            self.tick()  # resume with a fresh frame, not the stale one
        self.draw()

    def action_reset(self) -> None:
        self.model.reset()
        self.view = View(self.view.status, self.view.problem)
        if self.paused:
            self.draw()
        else:
            self.tick()

    def action_help(self) -> None:
        if isinstance(self.screen, HelpScreen):
            self.pop_screen()
        else:
            self.push_screen(HelpScreen())


# Command line


def main(
    run_dir: Path | None,
    config: Path | None,
    *,
    interval: float = DEFAULT_INTERVAL_S,
    once: bool = False,
    out: TextIO,
    err: TextIO,
) -> int:
    """``mpipeline top``: 0 on quit; ``--once``: 1 when no run is there; 2: bad config."""
    try:
        where = rundir.find_run_dir(run_dir, config)
    except ConfigError as exc:
        err.write(f"mpipeline top: invalid configuration:\n{exc}\n")
        return int(ExitCode.USAGE)
    if interval < MIN_INTERVAL_S:
        err.write(f"mpipeline top: --interval must be at least {MIN_INTERVAL_S}s\n")
        return int(ExitCode.USAGE)
    source = RunSource(where)
    try:
        if once:
            return _once(source, where, interval, out, err)
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            err.write("mpipeline top: needs a terminal; use --once for a text snapshot\n")
            return int(ExitCode.USAGE)
        TopApp(source, interval=interval, run_dir=where).run()
        return int(ExitCode.OK)
    finally:
        source.close()


def _once(source: Source, run_dir: Path, interval: float, out: TextIO, err: TextIO) -> int:
    """Two frames ``interval`` apart (rates need two), printed as text like ``top -b -n 2``."""
    model = Model()
    first = model.update(source())
    if first.status is None:
        err.write(f"mpipeline top: {first.problem}\n")
        return int(ExitCode.FAILURE)
    time.sleep(interval)
    view = model.update(source())
    if view.status is None:
        err.write(f"mpipeline top: {view.problem}\n")
        return int(ExitCode.FAILURE)
    width = shutil.get_terminal_size((ONCE_WIDTH, 40)).columns
    out.write(draw.render_text(view, run_dir=run_dir, interval=interval, width=width))
    return int(ExitCode.OK)

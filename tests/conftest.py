"""What every test shares: required parts, hypothesis profiles, the shared-memory
leak check and a private run dir.

Required parts. Prometheus, promtool, llama-cpp-python with its Gemma model,
py-spy, openssl: scripts/setup.sh installs them all. A test that finds one
missing calls ``missing`` (or ``require_binary``/``require_module``), which
skips on a developer's machine and fails under ``CI=true`` (.ci/run sets it),
so a CI machine without them can never pass by skipping. Any other skip fails
under CI too (``pytest_runtest_makereport`` below), except ``machine_fact``:
a fact of the machine no install changes, such as being root.

Hypothesis. Profile ``dev`` (the library's defaults) locally; ``ci`` under
``CI=true``: no deadline, since one example slowed by a loaded 2-core box is
not a failure, and twice the examples. ``HYPOTHESIS_PROFILE`` picks one by name.
"""

from __future__ import annotations

import importlib
import os
import shutil
import struct
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import psutil
import pytest
from _pytest.outcomes import Skipped  # pytest.skip.Exception, as a type mypy can subclass
from hypothesis import HealthCheck, settings

from mpipeline import _shm

# CI=true (GitHub Actions, GitLab and most others set it; .ci/run does).
CI = os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}

settings.register_profile("dev")
settings.register_profile(
    "ci",
    deadline=None,
    max_examples=200,
    # Generating data on a box shared with other jobs may be slow; that says nothing.
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if CI else "dev"))


class MachineFact(Skipped):
    """A skip that stands under CI: the machine cannot run the test, whatever is installed."""


def machine_fact(reason: str) -> NoReturn:
    """Skip, even under CI: ``reason`` is a fact of this machine (root, /dev/shm's size)."""
    __tracebackhide__ = True  # report the test's line, as pytest.skip does
    raise MachineFact(reason)


def missing(part: str, fix: str) -> NoReturn:
    """A required ``part`` is absent: skip locally, fail under CI, saying how to ``fix`` it."""
    __tracebackhide__ = True
    if CI:
        pytest.fail(f"{part} is missing and CI=true requires it: {fix}", pytrace=False)
    pytest.skip(f"{part} is missing: {fix}")


def require_binary(name: str, fix: str) -> str:
    """The path of the program ``name``, else ``missing``."""
    __tracebackhide__ = True
    path = shutil.which(name)
    if path is None:
        missing(name, fix)
    return path


def require_module(name: str, fix: str) -> ModuleType:
    """The module ``name`` imported, else ``missing``."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module {name}", fix)


def _ci_verdict(report: pytest.TestReport | pytest.CollectReport, call: object) -> None:
    """Under CI a skip is a failure unless it is a ``machine_fact``."""
    if not (CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    excinfo = getattr(call, "excinfo", None)
    if excinfo is not None and excinfo.errisinstance(MachineFact):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"skipped under CI=true, where nothing required may be missing: {reason}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    _ci_verdict(report, call)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    _ci_verdict(report, getattr(report, "call", None))
    return report


# How long child processes get to unlink their segments after a test returns.
LEAK_GRACE_S = 2.0
LEAK_POLL_S = 0.02
# How often the watcher looks for new segments while a test runs: often enough
# to see every creator alive (a supervisor lives for a second at least), seldom
# enough to stay out of tests that measure this process's CPU (0.1 % of a core;
# at 50 ms it was 0.4 % and an idle-ring test that allows 1 % failed once).
WATCH_POLL_S = 0.25


def _segments() -> set[str]:
    """Names of every mpipeline segment and doorbell in /dev/shm."""
    try:
        return {name for name in os.listdir(_shm.SHM_DIR) if name.startswith(_shm.PREFIX)}
    except FileNotFoundError:
        return set()


def _creator(name: str) -> tuple[int, int] | None:
    """The pid and start time in the header of ``name``'s segment (a doorbell
    belongs to its segment); None while it is unreadable or not yet written."""
    base = name
    for suffix in _shm.BELL_SUFFIXES:
        base = base.removesuffix(suffix)
    try:
        with open(_shm.SHM_DIR / base, "rb") as f:
            _magic, pid, start_ticks = _shm.CREATOR_SLOTS.unpack(f.read(_shm.CREATOR_SLOTS.size))
    except (OSError, struct.error):
        return None
    return (pid, start_ticks) if pid else None


def _verdict(name: str) -> bool | None:
    """True: a process of this test session made ``name``; False: a live process
    elsewhere did (another pipeline or test run of this user); None: cannot tell
    now (header not written yet, or its creator already gone)."""
    creator = _creator(name)
    if creator is None:
        return None
    pid, start_ticks = creator
    me = os.getpid()
    if pid == me:
        return True
    if not _shm.process_alive(pid, start_ticks):
        return None
    try:
        return any(parent.pid == me for parent in psutil.Process(pid).parents())
    except psutil.Error:
        return None


class _SegmentWatch(threading.Thread):
    """Tells every segment that appears during a test as ours or foreign, at birth.

    /dev/shm is shared by everything on the host, and a creator's parentage can
    only be read while it lives: a pipeline elsewhere that was SIGKILLed during
    our test left segments whose dead creator looked like ours, and the test
    failed with "segments left behind" (issue 11). So the watcher classifies
    each new name while its creator still runs, and the leak check counts only
    the segments of this test's own runs.
    """

    def __init__(self, before: set[str]) -> None:
        super().__init__(name="segment-watch", daemon=True)
        self._settled = set(before)
        self.foreign: set[str] = set()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(WATCH_POLL_S):
            self.look()

    def look(self) -> None:
        for name in _segments() - self._settled:
            verdict = _verdict(name)
            if verdict is None:
                continue  # look again next time
            self._settled.add(name)
            if not verdict:
                self.foreign.add(name)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.look()


def _leaked(before: set[str], watch: _SegmentWatch) -> set[str]:
    """New segments of ours: not seen as foreign, and not foreign now.

    A segment whose creator died before the watcher could ask counts as ours:
    a leak is reported rather than missed.
    """
    return {name for name in _segments() - before - watch.foreign if _verdict(name) is not False}


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Fail a test that leaves new ``/dev/shm/mpl-*`` segments or doorbells behind.

    Segments that existed before the test are ignored, so a leak is reported
    once, by the test that made it. So are segments made by processes that are
    not of this test session (see ``_SegmentWatch``).
    """
    before = _segments()
    watch = _SegmentWatch(before)
    watch.start()
    try:
        yield
    finally:
        watch.stop()
    deadline = time.monotonic() + LEAK_GRACE_S
    while (leaked := _leaked(before, watch)) and time.monotonic() < deadline:
        time.sleep(LEAK_POLL_S)
    if leaked:
        pytest.fail(f"shared-memory segments left behind: {', '.join(sorted(leaked))}")


@pytest.fixture
def tmp_run_dir(tmp_path: Path) -> Path:
    """An empty run directory readable only by its owner (0700), as the supervisor makes."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o700)
    return run_dir

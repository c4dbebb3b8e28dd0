"""Fixtures shared by every test: the shared-memory leak check and a private run dir."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mpipeline import _shm

# How long child processes get to unlink their segments after a test returns.
LEAK_GRACE_S = 2.0
LEAK_POLL_S = 0.02


def _segments() -> set[str]:
    """Names of every mpipeline segment and doorbell in /dev/shm."""
    try:
        return {name for name in os.listdir(_shm.SHM_DIR) if name.startswith(_shm.PREFIX)}
    except FileNotFoundError:
        return set()


def _foreign(name: str) -> bool:
    """True when a live process outside this test session created segment ``name``.

    /dev/shm is shared by everything on the host, so a pipeline or a test run
    started elsewhere must not fail our tests. The creator's pid and start time
    sit in the segment header; a doorbell belongs to its segment.
    """
    base = name.split(".", 1)[0]
    try:
        with open(_shm.SHM_DIR / base, "rb") as f:
            _magic, pid, start_ticks = _shm.CREATOR_SLOTS.unpack(f.read(_shm.CREATOR_SLOTS.size))
    except (OSError, struct.error):
        return False  # gone, unreadable or still being created: count it as ours
    me = os.getpid()
    if pid == me or not _shm.process_alive(pid, start_ticks):
        return False
    try:
        return all(parent.pid != me for parent in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def _leaked(before: set[str]) -> set[str]:
    return {name for name in _segments() - before if not _foreign(name)}


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Fail a test that leaves new ``/dev/shm/mpl-*`` segments or doorbells behind.

    Segments that existed before the test are ignored, so a leak is reported
    once, by the test that made it. So are segments whose creator is alive and
    not a process of this test session.
    """
    before = _segments()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while (leaked := _leaked(before)) and time.monotonic() < deadline:
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

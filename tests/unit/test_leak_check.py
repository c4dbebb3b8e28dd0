"""The suite's own leak check counts this session's segments, not a neighbour's.

A pipeline of the same user that another session SIGKILLed during a test left
segments whose dead creator the old check took for ours, and a good test failed
at teardown ("shared-memory segments left behind", issue 11).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mpipeline import _shm
from tests.conftest import _leaked, _segments, _SegmentWatch

# Makes a ring and dies without removing it, as a SIGKILLed supervisor does.
CREATE_AND_DIE = textwrap.dedent(
    """
    import os, sys, time
    from mpipeline.ring import Ring
    ring = Ring.create(4096, sys.argv[1])
    open(sys.argv[2], "w").close()
    time.sleep(float(sys.argv[3]))
    os._exit(0)
    """
)


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _wait_gone(name: str, timeout: float = 30.0) -> None:
    """Wait until the creator in ``name``'s header has exited."""
    with open(_shm.SHM_DIR / name, "rb") as f:
        _magic, pid, start = _shm.CREATOR_SLOTS.unpack(f.read(_shm.CREATOR_SLOTS.size))
    deadline = time.monotonic() + timeout
    while _shm.process_alive(pid, start):
        assert time.monotonic() < deadline, f"pid {pid} did not exit"
        time.sleep(0.01)


def test_a_neighbours_dead_run_is_not_our_leak(tmp_path: Path) -> None:
    before = _segments()
    watch = _SegmentWatch(before)
    watch.start()
    name = f"mpl-neighbour{os.getpid()}-ring"
    ready = tmp_path / "ready"
    try:
        # setsid -f: the creator's parent is not us (as for another session's pipeline).
        subprocess.run(
            ["setsid", "-f", sys.executable, "-c", CREATE_AND_DIE, name, str(ready), "0.5"],
            check=True,
        )
        _wait_for(ready)
        _wait_gone(name)
        watch.stop()
        assert {name, *(name + s for s in _shm.BELL_SUFFIXES)} <= watch.foreign
        assert _leaked(before, watch) == set()
    finally:
        watch.stop()
        _shm.unlink_segment(name)


def test_a_run_of_ours_that_died_with_its_segments_is_a_leak(tmp_path: Path) -> None:
    before = _segments()
    watch = _SegmentWatch(before)
    watch.start()
    name = f"mpl-ours{os.getpid()}-ring"
    ready = tmp_path / "ready"
    try:
        child = subprocess.Popen([sys.executable, "-c", CREATE_AND_DIE, name, str(ready), "0.5"])
        _wait_for(ready)
        assert child.wait(30) == 0
        watch.stop()
        ours = {name, *(name + s for s in _shm.BELL_SUFFIXES)}
        # Only ours is judged: another pipeline of this user (a bench beside the suite)
        # may create segments meanwhile, which the watcher rightly calls foreign.
        assert not ours & watch.foreign
        assert _leaked(before, watch) == ours
    finally:
        watch.stop()
        _shm.unlink_segment(name)

"""Segments under /dev/shm: names, modes, ownership by pid+start time, and the stale sweep."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpipeline import _shm
from mpipeline.errors import RingError, RingNotFound
from mpipeline.ring import MAGIC, S_CREATOR_PID, S_CREATOR_START, Ring
from tests.conftest import machine_fact


def _dead_pid() -> int:
    """A pid above pid_max: no process can ever have it."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def _set_slot(name: str, slot: int, value: int) -> None:
    with open(_shm.segment_path(name), "r+b") as f:
        f.seek(slot * 8)
        f.write(value.to_bytes(8, "little"))


@pytest.fixture
def prefix() -> Iterator[str]:
    """A private name space, so a sweep never touches anyone else's segments."""
    pre = f"{_shm.PREFIX}t{secrets.token_hex(4)}-"
    yield pre
    for path in _shm.SHM_DIR.glob(pre + "*"):
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink()


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# Names


@pytest.mark.parametrize("name", ["mpl-a", "mpl-run1-rag0-assemble0", "mpl-" + "x" * 200])
def test_check_name_accepts(name: str) -> None:
    assert _shm.check_name(name) == name


@pytest.mark.parametrize("name", ["", "a", "mpl-", "mpl-a/b", "../mpl-a", "/dev/shm/mpl-a"])
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="must start with 'mpl-'"):
        _shm.check_name(name)


def test_segment_path_is_under_dev_shm() -> None:
    assert _shm.segment_path("mpl-a") == Path("/dev/shm/mpl-a")


# Create, attach, unlink


def test_segments_and_doorbells_are_0600_even_with_umask_000() -> None:
    with umask(0o000), Ring.create(1024) as ring:
        paths = [_shm.segment_path(ring.name)]
        paths += [_shm.SHM_DIR / (ring.name + s) for s in _shm.BELL_SUFFIXES]
        for path in paths:
            st = path.stat()
            assert stat.S_IMODE(st.st_mode) == 0o600, path
            assert st.st_uid == os.getuid()
        assert stat.S_ISFIFO(paths[1].stat().st_mode)


def test_create_segment_is_exclusive_and_fully_backed(prefix: str) -> None:
    name = prefix + "seg"
    fd, mem = _shm.create_segment(name, 4096)
    try:
        assert len(mem) == 4096
        assert os.fstat(fd).st_blocks * 512 >= 4096  # fallocated, not sparse
        mem[:4] = b"mine"
        with pytest.raises(FileExistsError):
            _shm.create_segment(name, 8192)
        assert _shm.segment_path(name).stat().st_size == 4096
        fd2, mem2 = _shm.attach_segment(name)
        assert mem2[:4] == b"mine"
        mem2.close()
        os.close(fd2)
    finally:
        mem.close()
        os.close(fd)
        assert _shm.unlink_segment(name)


def test_attach_missing_segment_raises_ring_not_found(prefix: str) -> None:
    with pytest.raises(RingNotFound, match="no shared-memory segment") as info:
        _shm.attach_segment(prefix + "missing")
    assert isinstance(info.value, FileNotFoundError)


def test_open_missing_doorbell_raises_ring_not_found(prefix: str) -> None:
    with pytest.raises(RingNotFound, match="doorbell .* is missing"):
        _shm.open_bell(prefix + "missing", ".dbell")


def test_unlink_segment_removes_doorbells_and_reports_existence() -> None:
    ring = Ring.create(1024)
    ring.close()
    files = [_shm.segment_path(ring.name)]
    files += [_shm.SHM_DIR / (ring.name + s) for s in _shm.BELL_SUFFIXES]
    assert all(p.exists() for p in files)
    assert _shm.unlink_segment(ring.name) is True
    assert not any(p.exists() for p in files)
    assert _shm.unlink_segment(ring.name) is False


def test_ring_larger_than_dev_shm_fails_cleanly_at_create(prefix: str) -> None:
    st = os.statvfs(_shm.SHM_DIR)
    total = st.f_blocks * st.f_frsize
    if total == 0:
        machine_fact("/dev/shm has no size limit")
    capacity = (total + (1 << 30)) // 8 * 8
    with pytest.raises(RingError, match="--shm-size"):
        Ring.create(capacity, name=prefix + "huge", max_record=1024)
    assert not list(_shm.SHM_DIR.glob(prefix + "*"))


def test_shm_free_bytes_is_positive() -> None:
    assert _shm.shm_free_bytes() > 0


# Process identity


def test_proc_start_ticks_of_self_is_stable() -> None:
    ticks = _shm.proc_start_ticks(os.getpid())
    assert isinstance(ticks, int) and ticks > 0
    assert _shm.proc_start_ticks(os.getpid()) == ticks


def test_proc_start_ticks_survives_a_hostile_process_name() -> None:
    comm = Path("/proc/self/comm")
    old = comm.read_text().rstrip("\n")
    ticks = _shm.proc_start_ticks(os.getpid())
    try:
        comm.write_text("a) b (c) Z 1")  # spaces, parens and a fake state field
        assert _shm.proc_start_ticks(os.getpid()) == ticks
    finally:
        comm.write_text(old)


def test_proc_start_ticks_of_a_missing_pid_is_none() -> None:
    assert _shm.proc_start_ticks(_dead_pid()) is None


def test_process_alive() -> None:
    me = os.getpid()
    ticks = _shm.proc_start_ticks(me)
    assert ticks is not None
    assert _shm.process_alive(me, ticks)
    assert _shm.process_alive(me, 0)  # start time unknown: the pid alone decides
    assert not _shm.process_alive(me, ticks + 1)  # same pid, another process: reused
    assert not _shm.process_alive(_dead_pid(), 0)
    assert not _shm.process_alive(0, 0)
    assert not _shm.process_alive(-1, 0)


# The stale sweep


def _stale_ring(name: str, pid: int, start: int) -> None:
    """A ring whose creator is recorded as (pid, start) and which nobody unlinked."""
    ring = Ring.create(1024, name=name)
    ring.close()
    _set_slot(ring.name, S_CREATOR_PID, pid)
    _set_slot(ring.name, S_CREATOR_START, start)


def test_sweep_stale_removes_dead_creators_and_leaves_the_rest(prefix: str) -> None:
    me = os.getpid()
    ticks = _shm.proc_start_ticks(me) or 0
    _stale_ring(prefix + "dead", _dead_pid(), 0)
    _stale_ring(prefix + "reused", me, ticks + 1)
    with Ring.create(1024, name=prefix + "live") as live:
        # Our prefix but not our magic: not provably ours, so not ours to delete.
        foreign = _shm.segment_path(prefix + "foreign")
        foreign.write_bytes(struct.pack("<Q32xQQ", MAGIC ^ 1, _dead_pid(), 0) + bytes(200))
        tiny = _shm.segment_path(prefix + "tiny")
        tiny.write_bytes(b"short")
        (_shm.SHM_DIR / (prefix + "dir")).mkdir()
        orphan = _shm.SHM_DIR / (prefix + "gone.dbell")
        os.mkfifo(orphan, 0o600)

        removed = _shm.sweep_stale(prefix=prefix)

        assert sorted(removed) == [prefix + "dead", prefix + "reused"]
        left = sorted(p.name for p in _shm.SHM_DIR.glob(prefix + "*"))
        assert left == sorted(
            [
                live.name,
                live.name + ".dbell",
                live.name + ".sbell",
                prefix + "dir",
                prefix + "foreign",
                prefix + "tiny",
            ]
        )
        assert live.try_put(b"still works")
        assert _shm.sweep_stale(prefix=prefix) == []


def test_sweep_stale_never_removes_a_live_ring_with_a_dot_in_its_name(prefix: str) -> None:
    # A live ring called e.g. mpl-run.1-edge must not be mistaken for an orphaned
    # doorbell. Refusing such names at creation would do as well.
    try:
        live = Ring.create(1024, name=prefix + "run.1")
    except ValueError:
        return
    with live:
        _shm.sweep_stale(prefix=prefix)
        assert _shm.segment_path(live.name).exists(), "the sweep deleted a live ring"


def test_sweep_stale_uses_the_given_liveness_check(prefix: str) -> None:
    with Ring.create(1024, name=prefix + "a") as ring:
        seen: list[tuple[int, int]] = []

        def alive(pid: int, start: int) -> bool:
            seen.append((pid, start))
            return False

        assert _shm.sweep_stale(prefix=prefix, alive=alive) == [ring.name]
        assert seen == [(os.getpid(), _shm.proc_start_ticks(os.getpid()))]
        assert not _shm.segment_path(ring.name).exists()

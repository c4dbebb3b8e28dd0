"""The run directory: where it is, its typed state file, its lock."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from mpipeline import rundir, topology
from mpipeline.config import PipelineConfig
from mpipeline.errors import AlreadyRunning, MPipelineError


def test_resolve_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rundir.resolve_run_dir(PipelineConfig(run_dir="/srv/mpl")) == Path("/srv/mpl")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert rundir.resolve_run_dir(PipelineConfig()) == Path("/run/user/1000/mpipeline/port-8080")
    monkeypatch.setenv("XDG_RUNTIME_DIR", "")
    base = Path(f"/tmp/mpipeline-{os.getuid()}")
    assert rundir.resolve_run_dir(PipelineConfig()) == base / "port-8080"


def test_each_pipeline_of_a_user_gets_its_own_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two pipelines of one user never share a lock, a state file or a DLQ."""
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    base = Path(f"/tmp/mpipeline-{os.getuid()}")

    def run_dir(**fields: Any) -> Path:
        return rundir.resolve_run_dir(msgspec.convert(fields, PipelineConfig))

    assert run_dir(gateway={"port": 8081}) == base / "port-8081"
    assert run_dir(name="staging", gateway={"port": 8081}) == base / "staging"
    # No fixed port to tell it by: a library-only or port-0 pipeline.
    assert run_dir(gateway={"replicas": 0}) == base / "default"
    assert run_dir(gateway={"port": 0}) == base / "default"
    assert run_dir(name="a", run_dir="/srv/x") == Path("/srv/x")


def _info(run_dir: Path) -> rundir.RunInfo:
    cfg = PipelineConfig()
    return rundir.RunInfo(
        pid=os.getpid(),
        run_id="abcd1234",
        run_dir=str(run_dir),
        config="/x/pipeline.toml",
        control="mpl-abcd1234-control",
        ratelimit="mpl-abcd1234-ratelimit",
        upstreams=["openai"],
        topology=topology.build(cfg, "abcd1234", cpus=[0, 1]),
    )


def test_the_state_file_round_trips_typed_and_private(tmp_run_dir: Path) -> None:
    assert rundir.read_state(tmp_run_dir) is None
    info = _info(tmp_run_dir)
    rundir.write_state(info)
    path = tmp_run_dir / rundir.STATE_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert rundir.read_state(tmp_run_dir) == info
    # One shape for every reader, and plain JSON for tools.
    raw = json.loads(path.read_text())
    assert raw["topology"]["replicas"][0]["stage"] == "rag"
    rundir.remove_state(tmp_run_dir)
    rundir.remove_state(tmp_run_dir)
    assert not path.exists()


def test_a_state_file_that_is_not_a_runs_is_a_clear_error(tmp_run_dir: Path) -> None:
    (tmp_run_dir / rundir.STATE_FILE).write_text('{"pid": "x"}')
    with pytest.raises(MPipelineError, match="cannot read .*state.json"):
        rundir.read_state(tmp_run_dir)


def test_the_lock_refuses_a_second_holder_naming_it_and_the_ways_out(tmp_path: Path) -> None:
    run_dir = tmp_path / "nested" / "run"
    first = rundir.RunLock(run_dir)
    first.acquire()
    try:
        assert run_dir.stat().st_mode & 0o777 == 0o700
        assert rundir.lock_holder(run_dir) == os.getpid()
        with pytest.raises(AlreadyRunning) as refused:
            rundir.RunLock(run_dir).acquire()
        message = str(refused.value)
        assert f"already running in {run_dir} (pid {os.getpid()})" in message
        assert "--run-dir DIR" in message and f"Pipeline.attach('{run_dir}')" in message
    finally:
        first.release()
    assert rundir.lock_holder(run_dir) is None
    second = rundir.RunLock(run_dir)
    second.acquire()
    second.release()


# A run dir another local user could control is refused (RELIABILITY #43)

OTHER_UID = 65534  # nobody


def _foreign(path: Path) -> None:
    """Make ``path`` look like another user's: theirs when we may chown (root), else open."""
    path.chmod(0o777)
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)


def test_a_symlinked_run_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(real)
    with pytest.raises(MPipelineError, match=f"{link} is a symbolic link"):
        rundir.make(link)
    with pytest.raises(MPipelineError, match="is a symbolic link"):
        rundir.RunLock(link).acquire()
    assert list(real.iterdir()) == []


def test_an_open_or_foreign_run_dir_is_refused_naming_the_fix(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _foreign(run_dir)
    with pytest.raises(MPipelineError) as refused:
        rundir.make(run_dir)
    message = str(refused.value)
    assert f"refusing the run dir {run_dir}" in message
    assert "belongs to uid" in message or "open to other users" in message
    assert "mode 0700" in message and "run_dir (or --run-dir)" in message


def test_a_hijacked_default_base_is_refused_before_a_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another user made the shared base first, with links to our files inside."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    base = tmp_path / "xdg" / "mpipeline"
    base.mkdir(parents=True)
    victim = tmp_path / "precious"
    victim.write_text("mine")
    run_dir = base / "port-8080"
    run_dir.mkdir()
    (run_dir / rundir.LOCK_FILE).symlink_to(victim)
    (run_dir / f"{rundir.STATE_FILE}.tmp").symlink_to(victim)
    _foreign(run_dir)
    _foreign(base)
    cfg = PipelineConfig()
    assert rundir.resolve_run_dir(cfg) == run_dir
    with pytest.raises(MPipelineError, match=f"{base} "):
        rundir.RunLock(run_dir).acquire()
    assert victim.read_text() == "mine"
    with pytest.raises(MPipelineError):
        with rundir.connect(run_dir):
            pass


def test_missing_parents_are_made_0700_whatever_the_umask(tmp_path: Path) -> None:
    run_dir = tmp_path / "a" / "b" / "run"
    old = os.umask(0)
    try:
        rundir.make(run_dir)
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "b", run_dir):
        assert path.stat().st_mode & 0o777 == 0o700, path


def test_files_are_never_opened_through_a_link(tmp_run_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (tmp_run_dir / rundir.LOCK_FILE).symlink_to(victim)
    with pytest.raises(OSError):
        rundir.RunLock(tmp_run_dir).acquire()
    assert victim.read_text() == "mine"
    # A link planted where a temp file of ours might go is never followed (the temp
    # name is random and opened O_EXCL | O_NOFOLLOW).
    tmp = tmp_run_dir / f"{rundir.STATE_FILE}.{os.getpid()}.tmp"
    tmp.symlink_to(victim)
    rundir.write_state(_info(tmp_run_dir))
    assert victim.read_text() == "mine"
    assert rundir.read_state(tmp_run_dir) == _info(tmp_run_dir)

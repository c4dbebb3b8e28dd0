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

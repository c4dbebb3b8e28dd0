"""``mpipeline status`` and ``mpipeline profile`` against a real supervisor.

Status is read-only and exits 1 when nothing runs; profile finds a replica's
pid, writes a flamegraph or a top table with py-spy, exits 2 for an unknown
replica, and, when ptrace is refused, exits non-zero naming ptrace_scope and
CAP_SYS_PTRACE while the pipeline carries on untouched (RELIABILITY #41).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mpipeline.cli import main
from mpipeline.errors import ExitCode, MPipelineError
from mpipeline.ops import profile as profiling
from mpipeline.pipeline import Pipeline
from mpipeline.rundir import LOCK_FILE, STATE_FILE
from tests.conftest import machine_fact, missing, require_binary
from tests.integration.conftest import SupervisorFactory, SupervisorProcess

pytestmark = pytest.mark.integration

CLI_TIMEOUT_S = 60.0
# What py-spy prints as a non-root user when the kernel refuses the attach.
PY_SPY_REFUSED = (
    "Permission Denied: Try running again with elevated permissions by going "
    "'sudo env \"PATH=$PATH\" !!'"
)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mpipeline", *argv],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def _status(sp: SupervisorProcess) -> dict[str, Any]:
    done = _cli("status", "--run-dir", str(sp.run_dir), "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _require_py_spy() -> str:
    try:
        return profiling.find_py_spy()
    except MPipelineError as exc:
        missing("py-spy", f"scripts/setup.sh installs it (requirements/all.txt): {exc}")


def _skip_if_refused(done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0 and "ptrace was refused" in done.stderr:
        # The kernel's or the container's rule, not something an install changes.
        machine_fact(f"ptrace is not permitted here:\n{done.stderr}")


async def _profile_under_load(
    run_dir: Path, *argv: str
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run ``mpipeline profile`` while a client keeps requests flowing; count completions."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mpipeline",
        "profile",
        *argv,
        "--run-dir",
        str(run_dir),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    completed = 0
    async with Pipeline.attach(run_dir) as p:
        talk = asyncio.ensure_future(proc.communicate())
        while not talk.done():
            batch = [p.submit(f"load {completed + i}", session_id=f"s{i}") for i in range(32)]
            completed += len(await asyncio.gather(*batch))
        out, err = await talk
    assert proc.returncode is not None
    done = subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(), err.decode())
    return done, completed


# status


@pytest.mark.timeout(90)
def test_status_json_lists_every_replica_ready_with_ring_stats(
    running_supervisor: SupervisorProcess,
) -> None:
    sp = running_supervisor
    status = _status(sp)

    assert status["state"] == "RUNNING"
    assert status["supervisor_pid"] == sp.pid
    assert status["run_id"] == sp.run_id
    assert status["uptime_s"] > 0
    assert [r["name"] for r in status["replicas"]] == sp.replica_names()
    assert "assemble-0" in sp.replica_names()
    pids = [r["pid"] for r in status["replicas"]]
    assert len(set(pids)) == len(pids)
    for rep in status["replicas"]:
        assert rep["state"] == "READY", rep
        assert rep["pid"] == sp.replica_pid(rep["name"])
        assert Path(f"/proc/{rep['pid']}").exists()
        assert rep["restarts"] == 0
        assert rep["last_exit"] is None
        assert 0 <= rep["heartbeat_age_s"] < 5
    edges = sp.state["topology"]["edges"]
    assert [e["name"] for e in status["edges"]] == [e["name"] for e in edges]
    for edge in status["edges"]:
        assert edge["error"] is None, edge
        assert edge["capacity"] > 0
        assert edge["ring"]["used_bytes"] == 0
        assert edge["ring"]["records_in"] == edge["ring"]["records_out"]


@pytest.mark.timeout(90)
def test_status_table_found_through_the_config(running_supervisor: SupervisorProcess) -> None:
    sp = running_supervisor
    done = _cli("status", "--config", str(sp.config_path))

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"run {sp.run_id}  RUNNING  supervisor pid {sp.pid}")
    assert any(line.split()[:2] == ["REPLICA", "PID"] for line in lines)
    for name in sp.replica_names():
        row = next(line for line in lines if line.startswith(name + " "))
        assert str(sp.replica_pid(name)) in row.split()
        assert "READY" in row.split()
    assert any(line.startswith("assemble0 -> inference0 ") for line in lines)


@pytest.mark.timeout(30)
def test_status_without_a_supervisor_exits_1(tmp_run_dir: Path) -> None:
    done = _cli("status", "--run-dir", str(tmp_run_dir))

    assert done.returncode == ExitCode.FAILURE
    assert done.stdout == ""
    assert f"no supervisor is running in {tmp_run_dir}" in done.stderr


@pytest.mark.timeout(30)
def test_status_with_a_stale_state_file_exits_1(tmp_run_dir: Path) -> None:
    # What a SIGKILLed supervisor leaves: a state file naming a dead pid and segment.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    state = {"pid": dead.pid, "run_id": "00000000", "control": "mpl-00000000-control"}
    (tmp_run_dir / STATE_FILE).write_text(json.dumps(state))

    done = _cli("status", "--run-dir", str(tmp_run_dir), "--json")

    assert done.returncode == ExitCode.FAILURE
    assert f"names pid {dead.pid}, which is gone" in done.stderr


@pytest.mark.timeout(30)
def test_status_while_the_supervisor_boots_says_so(tmp_run_dir: Path) -> None:
    # A booting supervisor holds the run-dir lock but has not written its state yet.
    fd = os.open(tmp_run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())

        done = _cli("status", "--run-dir", str(tmp_run_dir))
    finally:
        os.close(fd)

    assert done.returncode == ExitCode.FAILURE
    assert f"(pid {os.getpid()}) is still starting" in done.stderr


# profile


@pytest.mark.timeout(90)
def test_profile_writes_a_flamegraph_and_leaves_the_pipeline_serving(
    running_supervisor: SupervisorProcess, tmp_path: Path
) -> None:
    _require_py_spy()
    sp = running_supervisor
    before = _status(sp)
    svg = tmp_path / "tmp.svg"

    done, completed = asyncio.run(
        _profile_under_load(sp.run_dir, "assemble", "--duration", "1", "--output", str(svg))
    )

    _skip_if_refused(done)
    assert done.returncode == 0, done.stderr
    assert f"sampling assemble-0 (pid {sp.replica_pid('assemble-0')})" in done.stderr
    assert svg.read_text().lstrip().startswith("<?xml")
    assert "<svg" in svg.read_text()
    assert completed > 0
    after = _status(sp)
    assert [r["pid"] for r in after["replicas"]] == [r["pid"] for r in before["replicas"]]
    assert all(r["restarts"] == 0 and r["state"] == "READY" for r in after["replicas"])


@pytest.mark.timeout(90)
def test_profile_top_prints_the_hottest_functions_without_a_tty(
    running_supervisor: SupervisorProcess,
) -> None:
    _require_py_spy()
    sp = running_supervisor

    done, _ = asyncio.run(
        _profile_under_load(sp.run_dir, "inference-0", "--top", "--idle", "--duration", "1")
    )

    _skip_if_refused(done)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"inference-0 (pid {sp.replica_pid('inference-0')}): ")
    assert lines[2].split() == ["%OWN", "%TOTAL", "FUNCTION", "(FILE)"]
    rows = lines[3:]
    assert rows, done.stdout
    assert any("mpipeline/" in row for row in rows)
    own = [float(row.split()[0]) for row in rows]
    assert own == sorted(own, reverse=True)


@pytest.mark.timeout(90)
def test_a_gateway_replica_is_profiled_like_a_stage(
    start_supervisor: SupervisorFactory,
) -> None:
    """``mpipeline profile gateway`` samples gateway-0 (it said "no replica named" before)."""
    _require_py_spy()
    sp = start_supervisor({"gateway.replicas": 1})
    done = _cli(
        "profile", "gateway", "--top", "--idle", "--duration", "1", "--run-dir", str(sp.run_dir)
    )

    _skip_if_refused(done)
    assert done.returncode == 0, done.stderr
    pid = sp.replica_pid("gateway-0")
    assert f"sampling gateway-0 (pid {pid})" in done.stderr
    assert done.stdout.startswith(f"gateway-0 (pid {pid}): ")
    unknown = _cli("profile", "gateway-1", "--run-dir", str(sp.run_dir))
    assert unknown.returncode == ExitCode.USAGE
    assert "gateway-0" in unknown.stderr.split("replicas: ")[1]


@pytest.mark.timeout(60)
def test_profile_unknown_replica_exits_2_listing_the_names(
    running_supervisor: SupervisorProcess,
) -> None:
    sp = running_supervisor
    done = _cli("profile", "nosuch-3", "--run-dir", str(sp.run_dir))

    assert done.returncode == ExitCode.USAGE
    assert "no replica named 'nosuch-3'" in done.stderr
    assert f"replicas: {', '.join(sp.replica_names())}" in done.stderr


@pytest.mark.timeout(30)
def test_profile_without_a_supervisor_exits_1(tmp_run_dir: Path) -> None:
    done = _cli("profile", "assemble", "--run-dir", str(tmp_run_dir))

    assert done.returncode == ExitCode.FAILURE
    assert "no supervisor is running" in done.stderr


@pytest.mark.timeout(60)
def test_profile_refused_by_ptrace_names_the_fix_and_leaves_the_pipeline_alone(
    running_supervisor: SupervisorProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sp = running_supervisor
    before = _status(sp)
    fake = tmp_path / "py-spy"
    fake.write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{PY_SPY_REFUSED}\nEOF\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(profiling, "find_py_spy", lambda: str(fake))
    svg = tmp_path / "out.svg"

    code = main(["profile", "assemble", "--run-dir", str(sp.run_dir), "--output", str(svg)])

    err = capsys.readouterr().err
    assert code == ExitCode.FAILURE
    assert "ptrace was refused" in err
    assert PY_SPY_REFUSED in err
    assert "ptrace_scope" in err
    assert "CAP_SYS_PTRACE" in err
    assert "sudo sysctl kernel.yama.ptrace_scope=0" in err
    assert "docker run --cap-add SYS_PTRACE" in err
    assert not svg.exists()
    after = _status(sp)
    assert [r["pid"] for r in after["replicas"]] == [r["pid"] for r in before["replicas"]]
    assert all(r["restarts"] == 0 and r["state"] == "READY" for r in after["replicas"])


@pytest.mark.timeout(60)
def test_profile_stops_before_py_spy_when_yama_forbids_attaching(
    running_supervisor: SupervisorProcess,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    scope = tmp_path / "ptrace_scope"
    scope.write_text("2\n")
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nCapEff:\t0000000000000000\n")
    marker = tmp_path / "py-spy-ran"
    fake = tmp_path / "py-spy"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(profiling, "YAMA_PTRACE_SCOPE", scope)
    monkeypatch.setattr(profiling, "PROC_SELF_STATUS", status)
    monkeypatch.setattr(profiling, "find_py_spy", lambda: str(fake))

    code = main(["profile", "post", "--run-dir", str(running_supervisor.run_dir), "--top"])

    err = capsys.readouterr().err
    assert code == ExitCode.FAILURE
    assert "kernel.yama.ptrace_scope is 2" in err
    assert "kernel.yama.ptrace_scope = 2 (admin-only" in err
    assert "CAP_SYS_PTRACE missing" in err
    assert not marker.exists()


@pytest.mark.timeout(60)
def test_real_py_spy_refusal_on_a_process_we_may_not_trace(tmp_path: Path) -> None:
    if os.geteuid() == 0 or os.stat("/proc/1").st_uid == os.geteuid():
        machine_fact("this user may trace pid 1 (root, or pid 1 is ours); simulated above instead")
    py_spy = _require_py_spy()
    target = profiling.Target("init", 1)  # another user's process: ptrace is refused

    with pytest.raises(MPipelineError) as info:
        profiling.record(py_spy, target, tmp_path / "x.svg", "flamegraph", profiling.Sampling(1))

    assert "ptrace_scope" in str(info.value)
    assert "CAP_SYS_PTRACE" in str(info.value)


@pytest.fixture
def capsh() -> str:
    """capsh, as root only: dropping CAP_SYS_PTRACE needs it (libcap2-bin)."""
    if os.geteuid() != 0:
        machine_fact("needs root to drop CAP_SYS_PTRACE")
    return require_binary("capsh", "apt-get install libcap2-bin (scripts/setup.sh)")


@pytest.mark.timeout(60)
def test_real_refusal_without_cap_sys_ptrace(
    capsh: str, running_supervisor: SupervisorProcess
) -> None:
    # Root without CAP_SYS_PTRACE may not trace a process holding capabilities it lacks.
    _require_py_spy()
    sp = running_supervisor
    before = _status(sp)
    cmd = shlex.join(
        [sys.executable, "-m", "mpipeline", "profile", "assemble", "--run-dir", str(sp.run_dir)]
        + ["--duration", "1"]
    )

    done = subprocess.run(
        [capsh, "--drop=cap_sys_ptrace", "--", "-c", cmd],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )

    assert done.returncode == ExitCode.FAILURE, done.stderr
    assert "ptrace was refused" in done.stderr
    assert "CAP_SYS_PTRACE missing" in done.stderr
    assert "ptrace_scope" in done.stderr
    after = _status(sp)
    assert [r["pid"] for r in after["replicas"]] == [r["pid"] for r in before["replicas"]]
    assert all(r["restarts"] == 0 and r["state"] == "READY" for r in after["replicas"])

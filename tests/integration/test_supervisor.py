"""The supervisor as an operator meets it: ``mpipeline run`` and signals.

SIGTERM and Ctrl-C drain and exit 0 with nothing left behind (RELIABILITY
#30, #31); a SIGKILLed supervisor takes its replicas with it and the next run
sweeps its segments (#7); bad configs exit 2 before anything exists (#32); a
second supervisor is refused (#34); boot errors halt and crash loops go FATAL
(#6). Clean exit always means I5: no segments, no live descendants, lock free.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from mpipeline import _shm, config
from mpipeline.config import CONFIG_ENV
from mpipeline.control import RunState
from mpipeline.errors import ErrorCode, ExitCode, MPipelineError, RequestFailed
from mpipeline.messages import Completed
from mpipeline.pipeline import Pipeline
from mpipeline.rundir import EFFECTIVE_CONFIG, STATE_FILE
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    alive,
    faults_env,
    lock_is_free,
    run_segments,
    wait_until,
    with_field,
)

pytestmark = pytest.mark.integration

# Seconds every replica gets to die after its supervisor (bbot#3207's bound).
ORPHAN_DEADLINE_S = 2.0
# Bound on a graceful stop: drain plus stopping the stages in flow order.
STOP_S = 30.0


def _assert_clean_exit(sp: SupervisorProcess, kids: list[psutil.Process]) -> None:
    """I5: the run's segments are gone, no descendant lives on, the lock is free."""
    assert run_segments(sp.run_id) == []
    wait_until(lambda: not any(alive(k) for k in kids), ORPHAN_DEADLINE_S, "children to exit")
    assert lock_is_free(sp.run_dir)
    assert not (sp.run_dir / STATE_FILE).exists()


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, int]:
    """Run ``python -m mpipeline ARGS``; return its exit code, stderr and pid."""
    with subprocess.Popen(
        [sys.executable, "-m", "mpipeline", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    ) as proc:
        _, stderr = proc.communicate(timeout=20)
    return proc.returncode, stderr, proc.pid


def _shm_segments_of(pid: int) -> list[str]:
    """Segments whose header names ``pid`` as their creator."""
    found = []
    for path in _shm.SHM_DIR.glob(f"{_shm.PREFIX}*"):
        if "." in path.name:
            continue
        try:
            with path.open("rb") as f:
                head = f.read(_shm.CREATOR_SLOTS.size)
        except (FileNotFoundError, PermissionError):
            continue
        if len(head) == _shm.CREATOR_SLOTS.size and _shm.CREATOR_SLOTS.unpack(head)[1] == pid:
            found.append(path.name)
    return found


# Shutdown


@pytest.mark.timeout(90)
def test_sigterm_drains_in_flight_requests_then_exits_clean(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(
        {"stages.inference.replicas": 2, "stages.inference.echo.token_delay_ms": 25.0}
    )
    kids = sp.descendants()
    assert len(kids) >= len(sp.process_names())
    words = " ".join(f"w{j}" for j in range(12))

    async def main() -> tuple[int, list[Completed | BaseException]]:
        async with Pipeline.attach(sp.run_dir) as p:
            tasks = [
                asyncio.ensure_future(p.submit(f"{i} {words}", session_id=f"s{i % 7}"))
                for i in range(40)
            ]
            await asyncio.sleep(0.05)  # let the client write them; each takes ~0.3 s
            finished_before = sum(t.done() for t in tasks)
            sp.send(signal.SIGTERM)
            with sp.control() as ctl:
                await asyncio.to_thread(
                    wait_until, lambda: ctl.state != RunState.RUNNING, 10, "draining"
                )
            with pytest.raises(RequestFailed) as refused:
                await p.submit("too late")
            assert refused.value.code == ErrorCode.SHUTTING_DOWN
            outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            return finished_before, list(outcomes)

    finished_before, outcomes = asyncio.run(main())
    assert finished_before < len(outcomes), "nothing was in flight when TERM arrived"
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors == []
    assert sp.wait_exit(STOP_S) == ExitCode.OK
    assert "drained" in sp.log()
    _assert_clean_exit(sp, kids)


@pytest.mark.timeout(60)
def test_second_sigterm_skips_the_drain_and_still_cleans_up(
    start_supervisor: SupervisorFactory,
) -> None:
    # Each reply takes 3 x 5 s: a drain would take far longer than the test allows.
    sp = start_supervisor(
        {"stages.inference.echo.token_delay_ms": 5000.0, "supervisor.drain_timeout_s": 60.0}
    )
    kids = sp.descendants()

    async def main() -> list[Completed | BaseException]:
        async with Pipeline.attach(sp.run_dir) as p:
            tasks = [asyncio.ensure_future(p.submit(f"slow {i} reply")) for i in range(5)]
            await asyncio.sleep(0.1)
            sp.send(signal.SIGTERM)
            await asyncio.to_thread(sp.wait_log, "draining in-flight work", 10)
            sent = time.monotonic()
            sp.send(signal.SIGTERM)
            code = await asyncio.to_thread(sp.wait_exit, 10)
            assert code == ExitCode.OK
            assert time.monotonic() - sent < 3.0
            return list(await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5))

    outcomes = asyncio.run(main())
    assert "second signal: stopping now" in sp.log()
    assert all(isinstance(o, RequestFailed) for o in outcomes), outcomes
    assert {o.code for o in outcomes if isinstance(o, RequestFailed)} <= {
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.STAGE_RESTARTED,
    }
    _assert_clean_exit(sp, kids)


@pytest.mark.timeout(60)
def test_ctrl_c_to_the_process_group_exits_0_without_tracebacks(
    running_supervisor: SupervisorProcess,
) -> None:
    sp = running_supervisor
    kids = sp.descendants()
    # What a terminal does: SIGINT to every process in the foreground group.
    sp.signal_group(signal.SIGINT)
    assert sp.wait_exit(STOP_S) == ExitCode.OK
    log = sp.log()
    assert "Traceback" not in log
    assert "KeyboardInterrupt" not in log
    assert "stopping: draining" in log
    _assert_clean_exit(sp, kids)


# Supervisor death


@pytest.mark.timeout(90)
def test_killed_supervisor_takes_its_replicas_and_the_next_run_sweeps(
    start_supervisor: SupervisorFactory,
) -> None:
    first = start_supervisor({"stages.inference.replicas": 2})
    run_id = first.run_id
    kids = first.descendants()
    replica_pids = {first.replica_pid(name) for name in first.replica_names()}
    assert replica_pids <= {k.pid for k in kids}

    first.send(signal.SIGKILL)
    killed = time.monotonic()
    first.wait_exit(5)
    wait_until(
        lambda: not any(alive(k) for k in kids), ORPHAN_DEADLINE_S, "replicas to die (PDEATHSIG)"
    )
    assert time.monotonic() - killed < ORPHAN_DEADLINE_S + 0.5
    leftover = [n for n in run_segments(run_id) if "." not in n]
    assert leftover, "SIGKILL skips cleanup: the segments should still be there"
    # The kernel released the flock with the process: no stale pidfile to clean.
    assert lock_is_free(first.run_dir)

    second = start_supervisor(config_path=first.config_path)
    assert run_segments(run_id) == []
    # The next run sweeps them, unless another supervisor on this machine (a bench
    # beside the suite: issue 20's acceptance) started first and swept them itself.
    match = re.search(r"removed (\d+) stale segments", second.log())
    if match is not None:
        assert int(match.group(1)) >= len(leftover)

    second_kids = second.descendants()
    second.send(signal.SIGTERM)
    assert second.wait_exit(STOP_S) == ExitCode.OK
    _assert_clean_exit(second, second_kids)


# Start-up refusals


def _bad_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\n{body}', encoding="utf-8")
    return path


BAD_CONFIGS = [
    pytest.param(
        "[stages.post]\nstrip = true\nstripp = false\n", "stages.post.stripp", 4, id="unknown-key"
    ),
    pytest.param(
        '[supervisor]\nrestart_intensity = "five"\n',
        "supervisor.restart_intensity",
        3,
        id="bad-type",
    ),
    pytest.param("[stages.rag]\ncpus = [4095]\n", "stages.rag.cpus", 3, id="cpus-out-of-range"),
    pytest.param(
        "[stages.inference]\nreplicas = 0\n", "stages.inference.replicas", 3, id="zero-replicas"
    ),
    pytest.param("[stages\nreplicas = 1\n", "TOML syntax", 2, id="toml-syntax"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("body", "named", "line"), BAD_CONFIGS)
def test_config_errors_exit_2_before_anything_exists(
    tmp_path: Path, body: str, named: str, line: int
) -> None:
    path = _bad_config(tmp_path, body)
    run_dir = tmp_path / "run"
    code, stderr, pid = _cli("run", "--config", str(path), "--run-dir", str(run_dir))
    assert code == ExitCode.USAGE, stderr
    assert named in stderr
    assert f"{path}:{line}" in stderr
    assert "Traceback" not in stderr
    # Nothing was made: no run dir (so no lock), no segment created by that process.
    assert not run_dir.exists()
    assert _shm_segments_of(pid) == []


@pytest.mark.timeout(30)
def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    code, stderr, _ = _cli("run", "--config", str(path), "--run-dir", str(tmp_path / "run"))
    assert code == ExitCode.USAGE
    assert "no such file" in stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(30)
def test_the_environment_names_the_config_and_a_missing_one_exits_2(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    bad = _bad_config(tmp_path, "[gateway]\nport = -1\n")
    code, stderr, _ = _cli("run", "--run-dir", str(run_dir), env={CONFIG_ENV: str(bad)})
    assert code == ExitCode.USAGE
    assert f"{bad}:3: gateway.port: must be >= 0" in stderr
    missing = tmp_path / "nope.toml"
    code, stderr, _ = _cli("run", "--run-dir", str(run_dir), env={CONFIG_ENV: str(missing)})
    assert code == ExitCode.USAGE
    assert f"{missing}: no such file" in stderr
    assert not run_dir.exists()


@pytest.mark.timeout(60)
def test_command_line_overrides_the_listeners_and_the_replicas_read_the_result(
    configs: ConfigFactory, start_supervisor: SupervisorFactory
) -> None:
    """--host, --port and --metrics-port win over the file; the effective config is
    written into the run dir, and that is the file the replicas (and status) read."""
    with socket.socket() as busy:  # the file's metrics port is taken: only the override runs
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        # 192.0.2.1 (TEST-NET-1) is no address of this host: binding it would fail.
        cfg = configs({"gateway.replicas": 1, "gateway.host": "192.0.2.1", "metrics.port": taken})
        overrides = ("--host", "127.0.0.1", "--port", "0", "--metrics-port", "0")
        sp = start_supervisor(cfg, args=overrides)
        with sp.explain():
            effective = configs.run_dir / EFFECTIVE_CONFIG
            assert sp.state["config"] == str(effective.resolve())
            want = with_field(with_field(cfg, "gateway.host", "127.0.0.1"), "gateway.port", 0)
            assert config.load(effective) == with_field(want, "metrics.port", 0)
            assert sp.url.startswith("http://127.0.0.1:")
            assert not sp.state["metrics_url"].startswith(f"http://127.0.0.1:{taken}/")
            assert httpx.get(sp.state["metrics_url"], timeout=10).status_code == 200


@pytest.mark.timeout(60)
def test_second_supervisor_on_the_same_run_dir_is_refused(
    running_supervisor: SupervisorProcess, start_supervisor: SupervisorFactory
) -> None:
    first = running_supervisor
    started = time.monotonic()
    second = start_supervisor(config_path=first.config_path, wait=False)
    assert second.wait_exit(20) == ExitCode.ALREADY_RUNNING
    elapsed = time.monotonic() - started
    log = second.log()
    assert "already running" in log
    assert f"pid {first.pid}" in log
    # It says how to run a second pipeline, and how to use this one.
    assert "--run-dir DIR, or `name` or `run_dir` in the config" in log
    assert f"Pipeline.attach('{first.run_dir}')" in log
    # Python start-up is most of it; the lock check itself is immediate.
    assert elapsed < 10, elapsed
    assert second.descendants() == []

    # The first is unaffected: same state file, still serving.
    assert first.running()
    assert first.wait_ready()["pid"] == first.pid

    async def ask() -> str:
        async with Pipeline.attach(first.run_dir) as p:
            done = await asyncio.wait_for(p.submit("still here "), 20)
            return done.text

    assert asyncio.run(ask()) == "still here"

    async def start_another() -> None:
        async with Pipeline(first.config_path):
            pass

    # A Python program that starts its own pipeline on the same run dir is told
    # to attach instead.
    with pytest.raises(MPipelineError, match=r"Pipeline\.attach\(") as refused:
        asyncio.run(start_another())
    assert "exited with code 5" in str(refused.value)


# Failing replicas


@pytest.mark.timeout(60)
def test_boot_error_halts_with_exit_3_naming_the_replica(
    start_supervisor: SupervisorFactory,
) -> None:
    sp = start_supervisor(env=faults_env("post:boot_error"), wait=False)
    started = time.monotonic()
    assert sp.wait_exit(40) == ExitCode.BOOT_ERROR
    log = sp.log()
    post = sp.process_of("post-0")
    assert f"replica {post} failed to boot" in log
    assert "injected boot_error fault" in log
    # No loop: one boot of post, however long it takes here.
    assert log.count(f"{post} failed to boot") == 1
    assert time.monotonic() - started < 30
    assert lock_is_free(sp.run_dir)
    assert not (sp.run_dir / STATE_FILE).exists()


@pytest.mark.timeout(90)
def test_crash_loop_goes_fatal_with_exit_4_and_clients_get_errors(
    start_supervisor: SupervisorFactory,
) -> None:
    # post dies on every message, and its successor re-reads the same record.
    sp = start_supervisor(
        {"supervisor.restart_intensity": 2, "supervisor.restart_period_s": 60.0},
        env=faults_env("post:crash_after=0"),
    )
    kids = sp.descendants()
    run_id = sp.run_id

    async def main() -> list[Completed | BaseException]:
        async with Pipeline.attach(sp.run_dir, timeout_s=30) as p:
            tasks = [asyncio.ensure_future(p.submit(f"doomed {i}")) for i in range(5)]
            outcomes = list(
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            )
            await asyncio.to_thread(sp.wait_exit, 30)
            with pytest.raises(RequestFailed) as late:
                await p.submit("after the end")
            assert late.value.code == ErrorCode.SHUTTING_DOWN
            return outcomes

    outcomes = asyncio.run(main())
    assert sp.proc.returncode == ExitCode.FATAL
    assert all(isinstance(o, RequestFailed) for o in outcomes), outcomes
    codes = {o.code for o in outcomes if isinstance(o, RequestFailed)}
    assert codes <= {ErrorCode.STAGE_RESTARTED, ErrorCode.SHUTTING_DOWN}
    log = sp.log()
    post = sp.process_of("post-0")
    assert re.search(rf"replica {post} died 3 times within 60s .*: FATAL", log), log
    assert log.count(f"replica {post} died (exit 70") == 2
    assert run_segments(run_id) == []
    wait_until(lambda: not any(alive(k) for k in kids), ORPHAN_DEADLINE_S, "children to exit")
    assert lock_is_free(sp.run_dir)


@pytest.mark.timeout(30)
def test_supervisor_pid_file_names_the_holder(running_supervisor: SupervisorProcess) -> None:
    lock = (running_supervisor.run_dir / "supervisor.lock").read_text().strip()
    assert lock == str(running_supervisor.pid)
    assert oct(running_supervisor.run_dir.stat().st_mode & 0o777) == oct(0o700)
    assert os.stat(running_supervisor.run_dir / STATE_FILE).st_mode & 0o077 == 0


def test_configs_factory_writes_files_the_cli_accepts(configs: ConfigFactory) -> None:
    path = configs.write({"stages.inference.replicas": 3})
    code, stderr, _ = _cli("config", "validate", str(path))
    assert code == 0, stderr


@pytest.mark.timeout(60)
def test_a_run_dir_another_user_controls_is_refused_and_nothing_is_written(
    tmp_path: Path, configs: ConfigFactory
) -> None:
    """RELIABILITY #43: another local user pre-made the run dir (mode 777, links to our
    files inside); the supervisor, status and dlq refuse it and touch nothing."""
    run_dir = tmp_path / "hijacked"
    run_dir.mkdir()
    victim = tmp_path / "precious"
    victim.write_text("mine")
    for name in ("supervisor.lock", "state.json.tmp", "dlq.jsonl"):
        (run_dir / name).symlink_to(victim)
    run_dir.chmod(0o777)
    if os.geteuid() == 0:
        os.chown(run_dir, 65534, 65534)
    path = configs.write(with_field(configs(), "run_dir", str(run_dir)))
    code, stderr, pid = _cli("run", "--config", str(path))
    assert code == ExitCode.FAILURE
    assert f"refusing the run dir {run_dir}" in stderr and "mode 0700" in stderr
    assert _shm_segments_of(pid) == []
    for argv in (("status",), ("dlq", "list")):
        code, stderr, _ = _cli(*argv, "--run-dir", str(run_dir))
        assert code != ExitCode.OK and f"refusing the run dir {run_dir}" in stderr, argv
    assert victim.read_text() == "mine"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "dlq.jsonl",
        "state.json.tmp",
        "supervisor.lock",
    ]

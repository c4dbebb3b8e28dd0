"""``mpipeline bench --http --quick`` end to end: wrk, the gateway, the peer, nothing left.

wrk is not optional here: ``scripts/setup.sh`` installs it, so a missing wrk
fails the test instead of skipping it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest

from mpipeline import _shm

pytestmark = pytest.mark.integration

BENCH_TIMEOUT_S = 90


def _check_phase(phase: dict[str, Any]) -> None:
    wrk = phase["wrk"]
    assert wrk["requests"] > 0
    assert phase["throughput_rps"] > 0
    assert wrk["connect_errors"] == wrk["status_errors"] == wrk["timeouts"] == 0
    assert 0 < wrk["p50_us"] <= wrk["p90_us"] <= wrk["p99_us"] <= wrk["max_us"]
    assert phase["cpu"], "no CPU figures for the system under test"
    assert phase["cpu_us_per_request"] > 0


@pytest.mark.timeout(BENCH_TIMEOUT_S + 30)
def test_quick_http_bench_measures_both_systems_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    cmd = [sys.executable, "-m", "mpipeline", "bench", "--http", "--quick", "--no-progress"]
    cmd += ["--cores", "1", "--connections", "16", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "uvicorn+starlette" in proc.stdout

    report = msgspec.json.decode(out.read_bytes())
    assert report["command"][:3] == ["mpipeline", "bench", "--http"]
    assert report["settings"]["wrk"].startswith("wrk")
    assert report["leftovers"] == []
    runs = {run["system"]: run for run in report["runs"]}
    assert set(runs) == {"gateway", "uvicorn+starlette"}
    pids: set[int] = set()
    for run in runs.values():
        assert run["cores"] == 1
        assert [p["mode"] for p in run["phases"]] == ["json", "stream"]
        for phase in run["phases"]:
            _check_phase(phase)
            pids |= {p["pid"] for p in phase["cpu"]}
        assert run["latency"]["samples"] > 0
        assert run["latency"]["failed"] == 0
        assert run["latency"]["p50_us"] > 0
        ttfb = run["ttfb"]
        assert ttfb["samples"] > 0
        assert ttfb["failed"] == 0
        # The echo worker sleeps 20 ms before its first token: nothing can beat that.
        assert ttfb["p50_us"] >= ttfb["subtract_us"] == 20_000
    gateway_processes = {p["name"] for p in runs["gateway"]["phases"][0]["cpu"]}
    assert {"rag-0", "inference-0", "stream-0"} <= gateway_processes

    # Nothing outlives the bench: no process it measured, no segment of its runs.
    assert len(runs["gateway"]["run_ids"]) == 2
    for run_id in runs["gateway"]["run_ids"]:
        assert not list(_shm.SHM_DIR.glob(f"{_shm.PREFIX}{run_id}-*"))
    alive = [pid for pid in pids if psutil.pid_exists(pid) and _is_live(pid)]
    assert not alive, f"processes left running: {alive}"


def _is_live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

"""``mpipeline bench --upstream --quick`` end to end: the fake upstream, the pipeline
with the OpenAI worker, the Starlette+httpx peer with 1 and 2 workers, nothing left.

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

BENCH_TIMEOUT_S = 60


def _check_phase(phase: dict[str, Any]) -> None:
    wrk = phase["wrk"]
    assert wrk["requests"] > 0
    assert phase["throughput_rps"] > 0
    assert wrk["connect_errors"] == wrk["status_errors"] == wrk["timeouts"] == 0
    assert 0 < wrk["p50_us"] <= wrk["p99_us"] <= wrk["max_us"]
    assert phase["cpu"], "no CPU figures for the system under test"
    assert phase["cpu_us_per_request"] > 0
    if phase["mode"] == "stream":
        assert phase["tokens_per_s"] == pytest.approx(phase["throughput_rps"] * 64)


def _check_probe(probe: dict[str, Any], *, tokens: int | None) -> None:
    assert probe["failed"] == 0
    assert probe["latency"]["samples"] > 0
    assert probe["latency"]["p50_us"] > 0
    if tokens is not None:
        # Every streamed reply carried all its tokens, through every proxy.
        assert probe["tokens_min"] == probe["tokens_max"] == tokens


@pytest.mark.timeout(BENCH_TIMEOUT_S + 30)
def test_quick_upstream_bench_measures_every_system_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "upstream.json"
    cmd = [sys.executable, "-m", "mpipeline", "bench", "--upstream", "--quick", "--no-progress"]
    cmd += ["--streams", "32", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "starlette+httpx 2w" in proc.stdout

    report = msgspec.json.decode(out.read_bytes())
    assert report["command"][:3] == ["mpipeline", "bench", "--upstream"]
    assert report["settings"]["wrk"].startswith("wrk")
    assert report["leftovers"] == []
    ttfb_tokens = report["settings"]["ttfb_tokens"]
    _check_probe(report["direct_latency"], tokens=None)
    _check_probe(report["direct_ttfb"], tokens=ttfb_tokens)
    runs = {(run["system"], run["workers"]): run for run in report["runs"]}
    assert set(runs) == {("mpipeline", 1), ("starlette+httpx", 1), ("starlette+httpx", 2)}
    pids: set[int] = set()
    for run in runs.values():
        assert [p["mode"] for p in run["phases"]] == ["json", "stream"]
        for phase in run["phases"]:
            _check_phase(phase)
            pids |= {p["pid"] for p in phase["cpu"]}
        _check_probe(run["latency"], tokens=None)
        _check_probe(run["ttfb"], tokens=ttfb_tokens)
    processes = {p["name"] for p in runs[("mpipeline", 1)]["phases"][0]["cpu"]}
    assert {"gateway-0", "rag-0", "inference-0", "post-0", "stream-0"} <= processes
    assert {v["target"] for v in report["verdicts"]} >= {
        "req/s JSON, all stages",
        "x peer 2w, req/s JSON",
        "x peer 2w, tokens/s",
    }

    # Nothing outlives the bench: no process it measured, no segment of its run.
    [run_id] = runs[("mpipeline", 1)]["run_ids"]
    assert not list(_shm.SHM_DIR.glob(f"{_shm.PREFIX}{run_id}-*"))
    alive = [pid for pid in pids if psutil.pid_exists(pid) and _is_live(pid)]
    assert not alive, f"processes left running: {alive}"


def _is_live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

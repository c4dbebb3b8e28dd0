"""``mpipeline bench --quick`` end to end: a real pipeline, the baseline, JSON and plot."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

pytestmark = pytest.mark.integration

BENCH_TIMEOUT_S = 60
# More cores than any machine has: must be skipped with a message, not fail.
TOO_MANY_CORES = 4096


def _check_phase(phase: dict[str, Any]) -> None:
    assert phase["completed"] > 0
    assert phase["failed"] == 0
    assert phase["throughput_rps"] > 0
    lat = phase["latency"]
    assert lat["samples"] == phase["completed"]
    assert 0 < lat["p50_us"] <= lat["p95_us"] <= lat["p99_us"] <= lat["max_us"]
    assert phase["cpu"], "no CPU figures"
    assert phase["cpu_us_per_request"] > 0


@pytest.mark.timeout(BENCH_TIMEOUT_S + 10)
def test_quick_bench_writes_json_with_throughput_latency_and_machine(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    want_plot = importlib.util.find_spec("matplotlib") is not None
    cmd = [sys.executable, "-m", "mpipeline", "bench", "--quick", "--no-progress"]
    cmd += ["--cores", f"1,{TOO_MANY_CORES}", "--json", str(out)]
    if want_plot:
        cmd += ["--plot", str(png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert f"skipping core counts [{TOO_MANY_CORES}]" in proc.stderr
    assert "full speed" in proc.stdout

    report = msgspec.json.decode(out.read_bytes())
    machine = report["machine"]
    assert machine["nproc"] >= 1
    assert machine["cpu_model"]
    assert machine["python"].split()[-1] == ".".join(map(str, sys.version_info[:3]))
    assert {"msgspec", "uvloop"} <= machine["versions"].keys()
    assert report["skipped_cores"] == [TOO_MANY_CORES]

    (run,) = report["runs"]
    assert run["cores"] == 1
    assert run["replicas"]["inference"] == 1
    assert [p["kind"] for p in run["phases"]] == ["full", "rate"]
    for phase in run["phases"]:
        _check_phase(phase)
    processes = {p["name"] for p in run["phases"][0]["cpu"]}
    assert {"client (bench)", "rag-0", "inference-0", "stream-0"} <= processes
    # Every stage stamps the result, so the hop breakdown covers the whole path.
    hops = run["phases"][1]["hops_us"]
    assert "submit>rag" in hops
    assert "stream>result" in hops

    baseline = report["baseline"]
    assert baseline["name"] == "asyncio-baseline"
    for phase in baseline["phases"]:
        _check_phase(phase)
    assert report["ratio"] > 0
    if want_plot:
        assert png.read_bytes().startswith(b"\x89PNG")


def test_bench_refuses_when_no_core_count_fits() -> None:
    cmd = [sys.executable, "-m", "mpipeline", "bench", "--cores", str(TOO_MANY_CORES)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert proc.returncode == 2
    assert "no core count" in proc.stderr

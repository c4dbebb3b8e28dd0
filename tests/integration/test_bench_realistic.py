"""``mpipeline bench --workload realistic --quick``: both sides did the real work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

pytestmark = pytest.mark.integration

BENCH_TIMEOUT_S = 120


@pytest.mark.timeout(BENCH_TIMEOUT_S + 10)
def test_realistic_quick_bench_streams_redacts_and_cites_on_both_sides(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mpipeline", "bench", "--workload", "realistic", "--quick"]
    cmd += ["--no-progress", "--cores", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "realistic workload: rag over 10,000 passages" in proc.stdout

    report = msgspec.json.decode(out.read_bytes())
    settings = report["settings"]
    assert settings["workload"] == "realistic"
    assert settings["passages"] >= 10_000
    assert "--workload" in report["command"]
    (run,) = report["runs"]
    assert run["name"] == "pipeline"
    assert report["baseline"]["name"] == "asyncio-baseline"
    for side in (run, report["baseline"]):
        full = side["phases"][0]
        assert full["kind"] == "full"
        assert full["completed"] > 0
        assert full["failed"] == 0
        assert full["cpu_us_per_request"] > 0
    assert report["ratio"] > 0
    checks = report["checks"]
    assert set(checks) == {"1 core", "asyncio baseline"}
    for check in checks.values():
        assert check["replies"] > 0
        assert check["failed"] == 0
        # Four planted values in every reply, each replaced by its placeholder.
        assert check["redactions"] == 4 * check["replies"]
        assert check["leaked"] == 0
        assert check["cited"] == check["replies"]
        # Streamed: several chunks a reply (16 tokens; post holds a tail while a
        # planted value may still be growing), and the chunks make the final text.
        assert check["chunks"] >= 4 * check["replies"]
        assert check["torn"] == 0
    assert settings["streamed"]


def test_realistic_workload_refuses_http() -> None:
    cmd = [sys.executable, "-m", "mpipeline", "bench", "--workload", "realistic", "--http"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--workload realistic runs in-process" in proc.stderr

"""Under CI=true a skip fails the run unless it is a fact of the machine (tests/conftest.py).

A nested pytest runs a module of one test per kind of skip, with the hooks of
tests/conftest.py, once as on a developer's machine and once as in CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CONFTEST = """
from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport

__all__ = ["pytest_make_collect_report", "pytest_runtest_makereport"]
"""
TESTS = """
import pytest

from tests.conftest import machine_fact, missing


def test_passes():
    pass


def test_plain_skip():
    pytest.skip("not today")


@pytest.mark.skipif(True, reason="a marker")
def test_marked_skip():
    pass


def test_missing_part():
    missing("promtool", "apt-get install prometheus")


def test_machine_fact():
    machine_fact("needs a smaller /dev/shm")
"""


def _outcomes(tmp_path: Path, ci: str) -> tuple[dict[str, str], str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_kinds.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", "test_kinds.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = re.findall(r"^test_kinds.py::(\w+) (\w+)", done.stdout, re.MULTILINE)
    return dict(lines), done.stdout


@pytest.mark.parametrize(
    ("ci", "expected"),
    [
        ("", {"test_passes": "PASSED"}),
        (
            "true",
            {
                "test_passes": "PASSED",
                "test_plain_skip": "FAILED",
                "test_marked_skip": "ERROR",  # the marker skips in setup
                "test_missing_part": "FAILED",
            },
        ),
    ],
    ids=["local", "ci"],
)
def test_skips_fail_under_ci_except_facts_of_the_machine(
    ci: str, expected: dict[str, str], tmp_path: Path
) -> None:
    outcomes, out = _outcomes(tmp_path, ci)
    skipped = {"test_plain_skip", "test_marked_skip", "test_missing_part", "test_machine_fact"}
    assert outcomes == dict.fromkeys(skipped - set(expected), "SKIPPED") | expected, out
    # A machine fact is reported at the test's line, as pytest.skip's are.
    assert re.search(r"SKIPPED \[1\] test_kinds.py:\d+: .*needs a smaller /dev/shm", out), out
    if ci:
        assert "promtool is missing and CI=true requires it" in out
        assert "skipped under CI=true, where nothing required may be missing: not today" in out

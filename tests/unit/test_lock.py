"""The lock files cover pyproject.toml, are hash-checked, and are what is installed."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCKS = [ROOT / "requirements" / "build.txt", ROOT / "requirements" / "all.txt"]
# "name[extra]>=1; marker" -> "name"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, list[str]]:
    """Each pinned name with the lines of its entry (the pin and its hashes)."""
    entries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            match = _NAME.match(line)
            assert match is not None, line
            current = entries.setdefault(_normalize(match[1]), [])
            current.append(line)
        elif current is not None and line.startswith("    --hash="):
            current.append(line)
    return entries


def test_every_dependency_and_extra_is_locked_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in ("dev", "bench", "llama"):
        wanted += project["optional-dependencies"][extra]
    pins = _pins(LOCKS[1])
    for requirement in wanted:
        match = _NAME.match(requirement)
        assert match is not None
        assert _normalize(match[1]) in pins, f"{requirement} is not in requirements/all.txt"
    for lock in LOCKS:
        for name, lines in _pins(lock).items():
            assert any("--hash=sha256:" in line for line in lines), f"{name} has no hash"


def test_the_environment_holds_exactly_the_lock() -> None:
    """What scripts/setup.sh installed is the lock: nothing newer, nothing extra."""
    script = str(ROOT / "scripts" / "_lockinfo.py")
    for command in ("drift", "unlocked"):
        done = subprocess.run(
            [sys.executable, script, command, *map(str, LOCKS)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert done.stdout == "", f"{command}:\n{done.stdout}"

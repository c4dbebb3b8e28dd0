"""Compare the running environment with the lock files (used by setup.sh and check-latest).

    python scripts/_lockinfo.py unlocked LOCK...   installed distributions no lock names
    python scripts/_lockinfo.py drift LOCK...      installed versions that differ from the lock

``unlocked`` is what setup.sh uninstalls, so that .venv holds exactly the lock
(as pip-sync does); mpipeline itself, installed editable, is always kept.
``drift`` is what scripts/check-latest reports: the upstream releases the next
``scripts/lock --upgrade`` would take.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

# A pinned line of a lock file: "name==version" (extras and markers may follow).
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^ ;\\]+)")
KEEP = {"mpipeline"}


def normalize(name: str) -> str:
    """PEP 503: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(paths: list[str]) -> dict[str, set[str]]:
    """Each locked name with its versions (one per interpreter marker)."""
    pins: dict[str, set[str]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as lock:
            for line in lock:
                if m := _PIN.match(line):
                    pins.setdefault(normalize(m[1]), set()).add(m[2])
    return pins


def installed() -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}


def main(command: str, paths: list[str]) -> int:
    pins = locked(paths)
    have = installed()
    if command == "unlocked":
        for name in sorted(set(have) - set(pins) - KEEP):
            sys.stdout.write(name + "\n")
        return 0
    if command == "drift":
        for name in sorted(have):
            if name in KEEP:
                continue
            want = pins.get(name)
            if want is None:
                sys.stdout.write(f"{name} {have[name]} (new, not in the lock)\n")
            elif have[name] not in want:
                sys.stdout.write(f"{name} {have[name]} (locked {', '.join(sorted(want))})\n")
        return 0
    sys.stderr.write(f"usage: {sys.argv[0]} unlocked|drift LOCK...\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "", sys.argv[2:]))

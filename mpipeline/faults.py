"""Fault injection for tests: ``MPIPELINE_FAULTS="stage:kind=arg,..."``.

Honoured only when ``MPIPELINE_TESTING=1`` as well, so a stray variable in
production does nothing. Kinds: ``boot_error`` (fail before ready),
``crash_after=N`` (hard exit after N messages), ``raise_on=TEXT`` (raise
for inputs containing TEXT), ``hang_after=N`` (block the loop after N).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    boot_error: bool = False
    crash_after: int | None = None
    raise_on: str | None = None
    hang_after: int | None = None

    @property
    def any(self) -> bool:
        return self != Faults()


def for_stage(stage: str, env: dict[str, str] | None = None) -> Faults:
    env = dict(os.environ) if env is None else env
    if env.get("MPIPELINE_TESTING") != "1":
        return Faults()
    spec = env.get("MPIPELINE_FAULTS", "")
    kw: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, what = item.partition(":")
        if where != stage:
            continue
        kind, _, arg = what.partition("=")
        if kind == "boot_error":
            kw["boot_error"] = True
        elif kind in ("crash_after", "hang_after"):
            kw[kind] = int(arg)
        elif kind == "raise_on":
            kw["raise_on"] = arg
        else:
            raise ValueError(f"unknown fault {kind!r} in MPIPELINE_FAULTS")
    return Faults(**kw)  # type: ignore[arg-type]

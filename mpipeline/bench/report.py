"""What ``mpipeline bench`` reports: the result types, machine info, table, targets, plot."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import msgspec

from mpipeline.bench.load import Phase

# The targets of the bench issue, checked on the 2-core row when there is one.
TARGET_RPS = 100_000.0
TARGET_RATIO = 1.8
TARGET_EFFICIENCY = 0.85
TARGET_LOW_RATE = 1000.0
TARGET_P50_US = 200.0
TARGET_P99_US = 1000.0
TARGET_CORES = 2
# Foreign CPU on the cores under test above this (% of one core) gets a warning.
NOISE_WARN_PERCENT = 10.0
_VERSIONED = ("mpipeline", "msgspec", "uvloop", "psutil", "xxhash")


class Machine(msgspec.Struct, frozen=True, kw_only=True):
    nproc: int
    affinity: list[int]
    cpu_model: str
    python: str
    platform: str
    versions: dict[str, str]
    # git commit of the measured tree ("+dirty" with local changes), when known.
    revision: str
    date: str


class Run(msgspec.Struct, frozen=True, kw_only=True):
    """Every phase of one configuration (a core count, or the baseline)."""

    name: str  # "pipeline" | "asyncio-baseline"
    cores: int
    cpus: list[int]
    replicas: dict[str, int]
    pinning: dict[str, list[int]]
    # Requests in flight in the full-speed phase.
    window: int
    phases: list[Phase]
    efficiency: float | None = None

    @property
    def full(self) -> Phase | None:
        return next((p for p in self.phases if p.kind == "full"), None)

    def at_rate(self, rate: float) -> Phase | None:
        return next((p for p in self.phases if p.offered_rps == rate), None)


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    target: str
    goal: float
    measured: float
    met: bool


class Report(msgspec.Struct, frozen=True, kw_only=True):
    machine: Machine
    command: list[str]
    settings: dict[str, float | int | str | list[int] | list[float] | None]
    runs: list[Run]
    baseline: Run | None
    skipped_cores: list[int]
    # Pipeline throughput at the most cores measured over the baseline's.
    ratio: float | None
    verdicts: list[Verdict]
    # ``--metrics both``: the further runs of each core count, in the order measured
    # after the one in ``runs`` (metrics off, off, on: an ABBA sequence, so a drift
    # of the machine over the four runs cancels out of the comparison).
    metrics_ab: list[Run] = msgspec.field(default_factory=list)
    # ``--layout``: the runs of every layout after the first, named "pipeline, <layout>".
    layout_runs: list[Run] = msgspec.field(default_factory=list)
    # ``--workload realistic``: each side's replies, read after its phases (bench.workload).
    checks: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)


def machine() -> Machine:
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return Machine(
        nproc=os.cpu_count() or 1,
        affinity=sorted(os.sched_getaffinity(0)),
        cpu_model=_cpu_model(),
        python=f"{platform.python_implementation()} {platform.python_version()}",
        platform=platform.platform(),
        versions=versions,
        revision=_revision(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def _revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def with_efficiency(runs: list[Run]) -> list[Run]:
    """Scaling efficiency: req/s per core relative to the fewest cores measured."""
    base = next((r for r in sorted(runs, key=lambda r: r.cores) if r.full is not None), None)
    if base is None or base.full is None or base.full.throughput_rps <= 0:
        return runs
    per_core = base.full.throughput_rps / base.cores
    out = []
    for r in runs:
        eff = r.full.throughput_rps / (per_core * r.cores) if r.full is not None else None
        out.append(msgspec.structs.replace(r, efficiency=eff))
    return out


def verdicts(runs: list[Run], baseline: Run | None) -> list[Verdict]:
    by_cores = {r.cores: r for r in runs}
    out: list[Verdict] = []
    two = by_cores.get(TARGET_CORES)
    if two is not None and two.full is not None:
        rps = two.full.throughput_rps
        out.append(
            Verdict(target="req/s, 2 cores", goal=TARGET_RPS, measured=rps, met=rps >= TARGET_RPS)
        )
        if baseline is not None and baseline.full is not None and baseline.full.throughput_rps > 0:
            ratio = rps / baseline.full.throughput_rps
            out.append(
                Verdict(
                    target="x asyncio baseline",
                    goal=TARGET_RATIO,
                    measured=ratio,
                    met=ratio >= TARGET_RATIO,
                )
            )
        if two.efficiency is not None and 1 in by_cores:
            eff = two.efficiency
            out.append(
                Verdict(
                    target="efficiency 1->2 cores",
                    goal=TARGET_EFFICIENCY,
                    measured=eff,
                    met=eff >= TARGET_EFFICIENCY,
                )
            )
        low = two.at_rate(TARGET_LOW_RATE)
        if low is not None:
            p50, p99 = low.latency.p50_us, low.latency.p99_us
            out.append(
                Verdict(
                    target="p50 us @1k/s",
                    goal=TARGET_P50_US,
                    measured=p50,
                    met=p50 <= TARGET_P50_US,
                )
            )
            out.append(
                Verdict(
                    target="p99 us @1k/s",
                    goal=TARGET_P99_US,
                    measured=p99,
                    met=p99 <= TARGET_P99_US,
                )
            )
    return out


# Rendering


# The run name of ``--metrics both``'s runs without metrics.
METRICS_OFF_NAME = "pipeline, metrics off"


def metrics_costs(report: Report) -> list[tuple[int, float, float, float]]:
    """Per core count: mean full-speed req/s with metrics on and off, and the share
    of throughput they cost (negative: the noise favoured metrics on)."""
    speeds: dict[tuple[int, bool], list[float]] = {}
    for r in [*report.runs, *report.metrics_ab]:
        if r.full is not None:
            key = (r.cores, r.name == METRICS_OFF_NAME)
            speeds.setdefault(key, []).append(r.full.throughput_rps)
    out = []
    for cores in sorted({c for c, _ in speeds}):
        on, off = speeds.get((cores, False)), speeds.get((cores, True))
        if not on or not off:
            continue
        mean_on, mean_off = sum(on) / len(on), sum(off) / len(off)
        if mean_off:
            out.append((cores, mean_on, mean_off, 1.0 - mean_on / mean_off))
    return out


def table(report: Report) -> str:
    rows: list[tuple[str, ...]] = [
        (
            "config",
            "cores",
            "phase",
            "req/s",
            "p50 us",
            "p95 us",
            "p99 us",
            "CPU us/req",
            "eff",
            "noise",
        )
    ]
    runs = [
        *report.runs,
        *report.layout_runs,
        *report.metrics_ab,
        *([report.baseline] if report.baseline else []),
    ]
    for r in runs:
        for p in r.phases:
            phase = "full speed" if p.kind == "full" else f"{p.offered_rps:,.0f}/s"
            eff = f"{r.efficiency:.0%}" if p.kind == "full" and r.efficiency is not None else ""
            rows.append(
                (
                    r.name,
                    str(r.cores),
                    phase,
                    f"{p.throughput_rps:,.0f}",
                    f"{p.latency.p50_us:,.0f}",
                    f"{p.latency.p95_us:,.0f}",
                    f"{p.latency.p99_us:,.0f}",
                    f"{p.cpu_us_per_request:.1f}",
                    eff,
                    f"{p.foreign_cpu_percent:.0f}%",
                )
            )
    lines = [_format_rows(rows)]
    noisy = max((p.foreign_cpu_percent for r in runs for p in r.phases), default=0.0)
    if noisy > NOISE_WARN_PERCENT:
        lines.append(
            f"warning: other processes took up to {noisy:.0f}% of a core from the cores "
            "under test (noise column): numbers are understated; rerun on a quiet machine"
        )
    cpu = _cpu_rows(runs)
    if cpu:
        lines += ["", "CPU per process at full speed (% of one core):", _format_rows(cpu)]
    hops = _hop_rows(report.runs)
    if hops:
        lines += [
            "",
            f"median hop latency at {TARGET_LOW_RATE:,.0f} req/s (us):",
            _format_rows(hops),
        ]
    if report.ratio is not None:
        lines += ["", f"pipeline / asyncio baseline at full speed: {report.ratio:.2f}x"]
        lines += _layout_ratios(report)
    costs = metrics_costs(report)
    if costs:
        lines += ["", "metrics cost at full speed (mean of on, off, off, on; same cores):"]
        lines += [
            f"  {c} core{'s' if c > 1 else ''}: on {on:,.0f} req/s, off {off:,.0f} req/s, "
            f"cost {cost:+.1%}"
            for c, on, off, cost in costs
        ]
    if report.verdicts:
        lines += ["", "targets:"]
        for v in report.verdicts:
            mark = "met" if v.met else "MISSED"
            lines.append(
                f"  {v.target:<24} goal {v.goal:>10,.2f}  measured {v.measured:>10,.2f}  {mark}"
            )
    if report.skipped_cores:
        have = len(report.machine.affinity)
        lines += ["", f"skipped core counts {report.skipped_cores}: only {have} cores available"]
    return "\n".join(lines)


def _layout_ratios(report: Report) -> list[str]:
    """Each further layout's most cores over the baseline, as the ratio line above."""
    base = report.baseline.full if report.baseline is not None else None
    if base is None or not base.throughput_rps:
        return []
    top: dict[str, Run] = {}
    for r in report.layout_runs:
        if r.full is not None and r.cores >= top.get(r.name, r).cores:
            top[r.name] = r
    return [
        f"{name} / asyncio baseline at full speed: "
        f"{r.full.throughput_rps / base.throughput_rps:.2f}x"
        for name, r in top.items()
        if r.full is not None
    ]


def _cpu_rows(runs: list[Run]) -> list[tuple[str, ...]]:
    heads = [f"{r.name} {r.cores}c" for r in runs if r.full is not None]
    names: list[str] = []
    for r in runs:
        if r.full is not None:
            names += [p.name for p in r.full.cpu if p.name not in names]
    if not names:
        return []
    rows: list[tuple[str, ...]] = [("process", *heads)]
    for name in names:
        cells = []
        for r in runs:
            if r.full is None:
                continue
            use = next((p.percent for p in r.full.cpu if p.name == name), None)
            cells.append("" if use is None else f"{use:.0f}")
        rows.append((name, *cells))
    totals = [f"{sum(p.percent for p in r.full.cpu):.0f}" for r in runs if r.full is not None]
    rows.append(("total", *totals))
    return rows


def _hop_rows(runs: list[Run]) -> list[tuple[str, ...]]:
    measured = [(r, r.at_rate(TARGET_LOW_RATE)) for r in runs]
    have = [(r, p) for r, p in measured if p is not None and p.hops_us]
    if not have:
        return []
    hops: list[str] = []
    for _, p in have:
        hops += [h for h in p.hops_us if h not in hops]
    rows: list[tuple[str, ...]] = [("hop", *(f"{r.cores}c" for r, _ in have))]
    rows += [(h, *(f"{p.hops_us.get(h, 0.0):.0f}" for _, p in have)) for h in hops]
    return rows


def _format_rows(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(report: Report, path: Path) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")


def stderr(text: str) -> None:
    sys.stderr.write(text + "\n")

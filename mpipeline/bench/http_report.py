"""What ``mpipeline bench --http`` reports: result types, the issue's targets, the table."""

from __future__ import annotations

from pathlib import Path

import msgspec

from mpipeline.bench import report as rep
from mpipeline.bench.cpu import ProcessCpu
from mpipeline.bench.probe import Probe
from mpipeline.bench.servers import CHAINED, GATEWAY, PEER
from mpipeline.bench.wrk import WrkStats

# The targets, checked on the 2-core rows.
TARGET_CORES = 2
TARGET_RPS = 10_000.0
TARGET_PEER_RATIO = 1.5
TARGET_P50_US = 400.0
TARGET_TTFB_EXTRA_US = 1000.0


class LoadPhase(msgspec.Struct, frozen=True, kw_only=True):
    """One wrk run at full speed."""

    mode: str  # "json" | "stream"
    connections: int
    threads: int
    throughput_rps: float
    wrk: WrkStats
    cpu: list[ProcessCpu]  # of the system under test
    cpu_us_per_request: float
    # wrk's own CPU, % of one core.
    loadgen_cpu_percent: float
    # CPU other processes (not the system, not wrk) took on its cores, % of one core.
    foreign_cpu_percent: float


class HttpRun(msgspec.Struct, frozen=True, kw_only=True):
    """Everything measured on one system at one core count."""

    system: str  # GATEWAY | PEER
    cores: int
    cpus: list[int]
    loadgen_cpus: list[int]
    start_command: list[str]
    phases: list[LoadPhase]
    latency: Probe | None
    ttfb: Probe | None
    # Supervisor run ids (their /dev/shm segments are mpl-<run_id>-*), for the gateway.
    run_ids: list[str] = []

    def phase(self, mode: str) -> LoadPhase | None:
        return next((p for p in self.phases if p.mode == mode), None)


class HttpReport(msgspec.Struct, frozen=True, kw_only=True):
    machine: rep.Machine
    command: list[str]
    settings: dict[str, float | int | str | list[int] | None]
    runs: list[HttpRun]
    skipped_cores: list[int]
    verdicts: list[rep.Verdict]
    # Processes or segments a stopped system left behind; empty when clean.
    leftovers: list[str]


def ratio(runs: list[HttpRun], cores: int, mode: str, system: str = GATEWAY) -> float | None:
    """``system``'s req/s over the peer's at ``cores`` in ``mode``, when both were measured."""
    got = {r.system: r.phase(mode) for r in runs if r.cores == cores}
    gw, peer = got.get(system), got.get(PEER)
    if gw is None or peer is None or peer.throughput_rps <= 0:
        return None
    return gw.throughput_rps / peer.throughput_rps


def verdicts(runs: list[HttpRun]) -> list[rep.Verdict]:
    """The issue's targets, on the gateway's 2-core row."""
    gw = next((r for r in runs if r.system == GATEWAY and r.cores == TARGET_CORES), None)
    if gw is None:
        return []
    out = []
    json_phase = gw.phase("json")
    if json_phase is not None:
        rps = json_phase.throughput_rps
        out.append(_verdict("req/s JSON, 2 cores", TARGET_RPS, rps, rps >= TARGET_RPS))
    r = ratio(runs, TARGET_CORES, "json")
    if r is not None:
        out.append(_verdict("x peer, JSON, 2 cores", TARGET_PEER_RATIO, r, r >= TARGET_PEER_RATIO))
    if gw.latency is not None and gw.latency.samples:
        p50 = gw.latency.p50_us
        out.append(_verdict("p50 us, low load", TARGET_P50_US, p50, p50 <= TARGET_P50_US))
    if gw.ttfb is not None and gw.ttfb.samples:
        extra = gw.ttfb.extra_p50_us
        goal = TARGET_TTFB_EXTRA_US
        out.append(_verdict("TTFB - TTFT p50 us", goal, extra, extra <= goal))
    return out


def _verdict(target: str, goal: float, measured: float, met: bool) -> rep.Verdict:
    return rep.Verdict(target=target, goal=goal, measured=measured, met=met)


def _load_table(report: HttpReport) -> str:
    """One row per system, core count and mode (JSON, stream) under wrk."""
    rows: list[tuple[str, ...]] = [
        (
            "system",
            "cores",
            "mode",
            "req/s",
            "p50 us",
            "p90 us",
            "p99 us",
            "errors",
            "CPU us/req",
            "wrk CPU",
            "noise",
        )
    ]
    for r in report.runs:
        for p in r.phases:
            w = p.wrk
            rows.append(
                (
                    r.system,
                    str(r.cores),
                    p.mode,
                    f"{p.throughput_rps:,.0f}",
                    f"{w.p50_us:,.0f}",
                    f"{w.p90_us:,.0f}",
                    f"{w.p99_us:,.0f}",
                    str(w.errors),
                    f"{p.cpu_us_per_request:.1f}",
                    f"{p.loadgen_cpu_percent:.0f}%",
                    f"{p.foreign_cpu_percent:.0f}%",
                )
            )
    return rep._format_rows(rows)


def table(report: HttpReport) -> str:
    lines = [_load_table(report)]
    noisy = max((p.foreign_cpu_percent for r in report.runs for p in r.phases), default=0.0)
    if noisy > rep.NOISE_WARN_PERCENT:
        lines.append(
            f"warning: other processes took up to {noisy:.0f}% of a core from the cores "
            "under test (noise column): numbers are understated; rerun on a quiet machine"
        )
    probes: list[tuple[str, ...]] = [
        ("system", "cores", "low-load p50 us", "p99 us", "TTFB p50 us", "p99 us", "- TTFT p50 us")
    ]
    for r in report.runs:
        lat, ttfb = r.latency, r.ttfb
        probes.append(
            (
                r.system,
                str(r.cores),
                f"{lat.p50_us:,.0f}" if lat else "",
                f"{lat.p99_us:,.0f}" if lat else "",
                f"{ttfb.p50_us:,.0f}" if ttfb else "",
                f"{ttfb.p99_us:,.0f}" if ttfb else "",
                f"{ttfb.extra_p50_us:,.0f}" if ttfb else "",
            )
        )
    s = report.settings
    lines += [
        "",
        f"latency probes: {s['probe_rate']:g} req/s non-streaming; streaming TTFB with a "
        f"{s['token_delay_ms']:g} ms echo delay before the first token (TTFT):",
        rep._format_rows(probes),
    ]
    for system in (GATEWAY, CHAINED):
        ratios = []
        for c in sorted({r.cores for r in report.runs}):
            for mode in ("json", "stream"):
                x = ratio(report.runs, c, mode, system)
                if x is not None:
                    ratios.append(f"{c}c {mode} {x:.2f}x")
        if ratios:
            lines += ["", f"{system} / {PEER}: " + ", ".join(ratios)]
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
    if report.leftovers:
        lines += ["", "left behind (a bug):", *(f"  {x}" for x in report.leftovers)]
    return "\n".join(lines)


def write_json(report: HttpReport, path: Path) -> None:
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")

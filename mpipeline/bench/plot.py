"""``mpipeline bench --plot``: throughput and scaling efficiency against cores, as a PNG.

Apart from ``report`` because it is the only part that needs matplotlib (the
``bench`` extra), imported when a plot is asked for.
"""

from __future__ import annotations

from pathlib import Path

from mpipeline.bench.report import TARGET_CORES, TARGET_EFFICIENCY, TARGET_RPS, Report


def plot(report: Report, path: Path) -> None:
    """Throughput and scaling efficiency against cores, as a PNG.

    :raises ImportError: when matplotlib is missing (the ``bench`` extra).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in sorted(report.runs, key=lambda r: r.cores) if r.full is not None]
    cores = [r.cores for r in runs]
    rps = [r.full.throughput_rps for r in runs if r.full is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(cores, rps, "o-", label="mpipeline")
    if runs:
        per_core = rps[0] / cores[0]
        ax1.plot(cores, [per_core * c for c in cores], ":", color="grey", label="linear")
    if report.baseline is not None and report.baseline.full is not None:
        ax1.axhline(
            report.baseline.full.throughput_rps, color="tab:red", ls="--", label="asyncio, 1 core"
        )
    if TARGET_CORES in cores:
        ax1.plot([TARGET_CORES], [TARGET_RPS], "r*", ms=10, label="target, 2 cores")
    ax1.set_xlabel("cores")
    ax1.set_ylabel("req/s (echo, 512 B, 16 tokens)")
    ax1.set_title("Throughput")
    ax1.set_xticks(cores)
    ax1.set_ylim(bottom=0)
    ax1.legend()
    eff = [100.0 * (r.efficiency or 0.0) for r in runs]
    ax2.plot(cores, eff, "o-")
    ax2.axhline(100.0 * TARGET_EFFICIENCY, color="tab:red", ls="--", label="target 85 %")
    ax2.set_xlabel("cores")
    ax2.set_ylabel("% of linear")
    ax2.set_title("Scaling efficiency")
    ax2.set_xticks(cores)
    ax2.set_ylim(0, 110)
    ax2.legend()
    m = report.machine
    fig.suptitle(f"{m.cpu_model}, {m.python}, {m.date[:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

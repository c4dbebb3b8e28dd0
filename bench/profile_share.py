"""Where a replica's CPU goes under full load: transport, codec, runner, stage work, loop.

Starts the pipeline from ``config/pipeline.toml``, keeps requests in flight at
full speed through the Python API, samples every replica with ``py-spy
record --format raw`` at the same time, and files each sample under the
innermost frame that belongs to one of the buckets below. Usage:
``python -m bench.profile_share [--seconds S] [--window N] [--config FILE]``
(``--config config/examples/chained.toml`` profiles the chained layout: a
placement group is one process, sampled once and named after its stages).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from mpipeline.control import R_PID
from mpipeline.pipeline import Pipeline

BUCKETS = (
    "transport (ring, doorbell)",
    "codec (msgspec)",
    "stage work",
    "runner bookkeeping",
    "event loop and the rest",
)


_WIDTH = max(map(len, BUCKETS))
# The column heads of a table of shares, one column per bucket.
HEADER = "".join(f"  {b:>{_WIDTH}s}" for b in BUCKETS)


def share_cells(counts: collections.Counter[str]) -> str:
    """One process's samples as a row of ``HEADER``'s columns: % of its samples each."""
    total = sum(counts.values()) or 1
    return "".join(f"  {100 * counts[b] / total:>{_WIDTH - 1}.0f}%" for b in BUCKETS)


def bucket(stack: str) -> str:
    """The bucket of a sample: its innermost frame that belongs to one."""
    for frame in reversed(stack.split(";")):
        if any(part in frame for part in ("/ring/", "ring.py", "_doorbell.py", "_shm.py")):
            return BUCKETS[0]
        if "codec.py" in frame:
            return BUCKETS[1]
        if any(part in frame for part in ("/stages/", "/workers/", "routing.py", "retrieval")):
            return BUCKETS[2]
        if "/runner/" in frame or "runner.py" in frame:
            return BUCKETS[3]
    return BUCKETS[4]


async def record_all(pids: dict[str, int], seconds: float, out: Path) -> None:
    """Sample every process in ``pids`` with py-spy over the same ``seconds``, into
    ``out/<name>.txt`` (raw: one line per distinct stack, its count last)."""
    pyspy = str(Path(sys.executable).with_name("py-spy"))
    # Popen returns once each sampler exists; they all sample the same window.
    samplers = [
        subprocess.Popen(  # noqa: ASYNC220
            [pyspy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "250"]
            + ["-f", "raw", "--nonblocking", "-o", str(out / f"{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: [s.wait() for s in samplers])


def stacks(path: Path) -> collections.Counter[str]:
    """The samples of one raw py-spy file by stack (empty when py-spy wrote none)."""
    counts: collections.Counter[str] = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            counts[stack] += int(n)
    return counts


async def drive(seconds: float, window: int, out: Path, config: str) -> list[str]:
    async with Pipeline(config, run_dir=out / "run") as p:
        ctl = p._ctl
        assert ctl is not None
        members: dict[int, list[str]] = {}
        for (st, i), slot in p._replica_slots.items():
            members.setdefault(ctl.get(slot, R_PID), []).append(f"{st}-{i}")
        # One sampler per process: a placement group's members share one.
        pids = {_label(names): pid for pid, names in members.items()}
        loop = asyncio.get_running_loop()
        stop = time.monotonic() + seconds + 2
        finished: asyncio.Future[None] = loop.create_future()
        sent = 0

        def submit() -> None:
            nonlocal sent
            if time.monotonic() > stop:
                if not finished.done():
                    finished.set_result(None)
                return
            future = p.submit_nowait(f"req {sent} " + "x" * 500)
            sent += 1
            future.add_done_callback(lambda _: submit())

        for _ in range(window):
            submit()
        await asyncio.sleep(1)  # warm up before sampling
        await record_all(pids, seconds, out)
        await finished
    return list(pids)


def _label(names: list[str]) -> str:
    """A process's name: its replica, or its group's first..last stage and index."""
    if len(names) == 1:
        return names[0]
    first, last = names[0].rpartition("-")[0], names[-1]
    return f"{first}..{last}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--window", type=int, default=512, help="requests in flight")
    parser.add_argument("--config", default="config/pipeline.toml", help="pipeline to profile")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        names = uvloop.run(drive(args.seconds, args.window, out, args.config))
        rows: dict[str, collections.Counter[str]] = {}
        for name in names:
            counts: collections.Counter[str] = collections.Counter()
            for stack, n in stacks(out / f"{name}.txt").items():
                counts[bucket(stack)] += n
            rows[name] = counts
    rows["all"] = sum(rows.values(), collections.Counter())
    width = max(12, *(len(name) + 1 for name in rows))
    print(f"{'replica':{width}s}{HEADER}")
    for name, counts in rows.items():
        print(f"{name:{width}s}{share_cells(counts)}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

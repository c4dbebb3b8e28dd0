"""What one parked hop costs: a ping-pong over two rings where every get parks.

Two processes, each with its own uvloop: the pinger puts a 512 B record on
ring A and awaits the reply on ring B; the ponger awaits ring A and puts the
record back on ring B. With ``spin_s=0`` every ``get`` finds its ring empty
and parks on the doorbell, and every put rings it, so a round trip is two
park/wake cycles: what a hop of the pipeline costs at low load (issue 16).
Reports round trips per second, the median round trip, and the CPU both
processes spent per hop (``time.process_time``). Usage:
``python -m bench.hop_cost [--n N] [--spin-us U] [--repeat R]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from multiprocessing.connection import Connection

import uvloop

from mpipeline.ring import Ring

_PAYLOAD = b"x" * 512


async def _pong(a: str, b: str, n: int, spin_s: float) -> float:
    ra, rb = Ring.attach(a, spin_s=spin_s), Ring.attach(b, spin_s=spin_s)
    cpu = time.process_time()
    try:
        for _ in range(n):
            view = await ra.get(timeout=10)
            await rb.put(bytes(view), timeout=10)
        return time.process_time() - cpu
    finally:
        ra.close()
        rb.close()


def _ponger(a: str, b: str, n: int, spin_s: float, conn: Connection) -> None:
    conn.send(uvloop.run(_pong(a, b, n, spin_s)))


async def _ping(a: str, b: str, n: int, spin_s: float) -> tuple[float, float, list[int]]:
    ra, rb = Ring.attach(a, spin_s=spin_s), Ring.attach(b, spin_s=spin_s)
    rtts: list[int] = []
    clock = time.perf_counter_ns
    try:
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(n):
            t = clock()
            await ra.put(_PAYLOAD, timeout=10)
            await rb.get(timeout=10)
            rtts.append(clock() - t)
        return time.process_time() - cpu, time.perf_counter() - wall, rtts
    finally:
        ra.close()
        rb.close()


def once(n: int, spin_s: float) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    with Ring.create(1 << 20) as a, Ring.create(1 << 20) as b:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_ponger, args=(a.name, b.name, n, spin_s, child))
        proc.start()
        try:
            cpu, wall, rtts = uvloop.run(_ping(a.name, b.name, n, spin_s))
            peer_cpu = parent.recv()
        finally:
            proc.join(10)
    hops = 2 * n
    return {
        "rt_per_s": n / wall,
        "p50_rtt_us": statistics.median(rtts) / 1e3,
        "cpu_us_per_hop": (cpu + peer_cpu) / hops * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="round trips per run")
    parser.add_argument("--spin-us", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    for _ in range(args.repeat):
        r = once(args.n, args.spin_us / 1e6)
        print(
            f"round trips/s {r['rt_per_s']:9,.0f}  p50 rtt {r['p50_rtt_us']:7.1f} us  "
            f"CPU per hop {r['cpu_us_per_hop']:6.1f} us",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

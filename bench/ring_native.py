"""Would a C ring core halve a hop? The Python ring against ``native/ringcore.c``.

Issue 16, item 3: ``try_put``/``try_get`` cost about 0.8 µs each in Python; if
a compiled core halves a hop, build it. This measures, on the same segment
and the same record format, interleaved and repeated (the box is noisy):

1. *calls*: ``try_put`` and ``try_get`` per call, one process, 200 records a
   round (puts timed, then gets timed), 64 B / 512 B / 4 KiB, checksums on/off;
2. *hops*: a hop's transport and codec as the runner pays them, one process:
   ``encode`` + ``try_put`` + ``try_get`` + ``decode_many`` of a real
   ``PromptRequest``, one message per record (low load) and 64 (full load);
3. *pinned*: two processes pinned to CPUs 0 and 1, the producer encoding and
   putting, the consumer getting and decoding (like ``bench.ring_vs_peers``
   *single*), msg/s.

Implementations: ``py`` (mpipeline.ring), ``c`` (the core calling the xxhash
package for the checksum, as the Python ring does) and ``c+xxh3`` (xxh3
inlined; only when an ``xxhash.h`` is given with ``--xxh3-include``).
Usage: ``python -m bench.ring_native [--rounds R] [--build-dir DIR]
[--xxh3-include DIR] [--skip-pinned]``. The runner's own per-message work is
not in here: ``bench.metrics_stage_cost`` measures a whole replica.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Final

from bench._ipc_loops import make_pool
from mpipeline.codec import Codec
from mpipeline.messages import PromptRequest
from mpipeline.ring import Ring
from mpipeline.ring._layout import _DATA_BELL, _SPACE_BELL

SIZES: Final = (64, 512, 4096)
CAPACITY: Final = 4 << 20
PER_ROUND: Final = 200
PINNED_N: Final = 100_000
# One process's own CPU time: a round preempted by other load on this shared
# box is not charged for the time it waited (the pinned runs use wall time).
CLOCK: Final = time.thread_time_ns

NATIVE: Final = Path(__file__).resolve().parents[1] / "native"

Put = Callable[[Any], bool]
Get = Callable[[], memoryview | None]


def load(path: Path, name: str = "") -> ModuleType:
    """Import a module from its path (an extension's name is its file stem)."""
    spec = importlib.util.spec_from_file_location(name or path.name.split(".")[0], path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Pair:
    """A ring with a producer handle and a consumer handle of one implementation."""

    def __init__(
        self, impl: str, mod: ModuleType | None, *, checksums: bool, name: str = ""
    ) -> None:
        if name:
            self.prod = Ring.attach(name)
        else:
            self.prod = Ring.create(CAPACITY, checksums=checksums, max_record=CAPACITY // 4)
        self.cons = Ring.attach(self.prod.name)
        self.cores: list[Any] = []
        if mod is None:
            self.put: Put = self.prod.try_put
            self.get: Get = self.cons.try_get
        else:
            pc = mod.Core(self.prod._mem, self.prod.name, bell=self._data_bell)
            cc = mod.Core(self.cons._mem, self.cons.name, bell=self._space_bell)
            self.cores = [pc, cc]
            self.put, self.get = pc.try_put, cc.try_get
        self.impl = impl

    def warm(self, size: int) -> None:
        """Cycle the whole data area once: first touches fault pages in, not timed."""
        buf = bytes(size)
        for _ in range(CAPACITY // ((size + 15) & -8) + 1):
            self.put(buf)
            self.get()

    def _data_bell(self) -> None:
        self.prod._bell(_DATA_BELL).ring()

    def _space_bell(self) -> None:
        self.cons._bell(_SPACE_BELL).ring()

    def close(self, *, unlink: bool = True) -> None:
        for core in self.cores:
            core.close()
        self.cons.close()
        self.prod.close()
        if unlink:
            self.prod.unlink()


def per_call(pair: Pair, buf: bytes) -> tuple[float, float]:
    """ns per try_put and per try_get over one round of PER_ROUND records."""
    put, get = pair.put, pair.get
    clock = CLOCK
    t0 = clock()
    for _ in range(PER_ROUND):
        put(buf)
    t1 = clock()
    for _ in range(PER_ROUND):
        get()
    t2 = clock()
    get()  # releases the last record
    return (t1 - t0) / PER_ROUND, (t2 - t1) / PER_ROUND


def per_batched(pair: Pair, buf: bytes) -> tuple[float, float]:
    """ns per record of the Python ring's put_many and get_many, 64 records a call."""
    ring, cons = pair.prod, pair.cons
    bufs = [buf] * 64
    clock = CLOCK
    t0 = clock()
    for _ in range(PER_ROUND // 64):
        ring.put_many(bufs)
    t1 = clock()
    for _ in range(PER_ROUND // 64):
        cons.get_many(64)
    t2 = clock()
    cons.get_many(64)  # releases the last batch
    n = PER_ROUND // 64 * 64
    return (t1 - t0) / n, (t2 - t1) / n


def per_hop(pair: Pair, codec: Codec[PromptRequest], msgs: list[PromptRequest], k: int) -> float:
    """ns per message of encode + try_put + try_get + decode_many, ``k`` messages a record."""
    put, get = pair.put, pair.get
    encode, decode = codec.encode_many, codec.decode_many
    groups = [msgs[i : i + k] for i in range(0, len(msgs), k)]
    t0 = CLOCK()
    for group in groups:
        put(encode(group))
        view = get()
        assert view is not None
        decode(view)
    return (CLOCK() - t0) / len(msgs)


def per_codec(codec: Codec[PromptRequest], msgs: list[PromptRequest], k: int) -> float:
    """ns per message of encode + decode_many alone: the hop without a ring."""
    encode, decode = codec.encode_many, codec.decode_many
    groups = [msgs[i : i + k] for i in range(0, len(msgs), k)]
    t0 = CLOCK()
    for group in groups:
        decode(encode(group))
    return (CLOCK() - t0) / len(msgs)


def summary(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.0f} / {min(xs):5.0f}"


def bench_calls(impls: dict[str, ModuleType | None], rounds: int) -> None:
    print("\n## try_put / try_get per call, one process (thread CPU ns, median / min)")
    print("| size B | checksums | impl | try_put | try_get | put+get |")
    print("|--:|:--|:--|--:|--:|--:|")
    for size in SIZES:
        buf = bytes(range(256)) * (size // 256) + bytes(size % 256)
        for crc in (True, False):
            pairs = {name: Pair(name, mod, checksums=crc) for name, mod in impls.items()}
            for pair in pairs.values():
                pair.warm(size)
            got: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in pairs}
            for _ in range(rounds):
                for name, pair in pairs.items():  # interleaved
                    p, g = per_call(pair, buf)
                    got[name][0].append(p)
                    got[name][1].append(g)
            batched: tuple[list[float], list[float]] = ([], [])
            for _ in range(rounds):
                p, g = per_batched(pairs["py"], buf)
                batched[0].append(p)
                batched[1].append(g)
            got["py put_many/get_many(64)"] = batched
            for name, (puts, gets) in got.items():
                both = [p + g for p, g in zip(puts, gets, strict=True)]
                print(
                    f"| {size} | {'on' if crc else 'off'} | {name} | {summary(puts)} "
                    f"| {summary(gets)} | {summary(both)} |"
                )
            for pair in pairs.values():
                pair.close()


def bench_hops(impls: dict[str, ModuleType | None], rounds: int) -> None:
    print("\n## A hop's transport + codec, one process (thread CPU ns per message, median / min)")
    print("| size B | msgs per record | impl | encode+put+get+decode | vs py |")
    print("|--:|--:|:--|--:|--:|")
    codec = Codec(PromptRequest)
    for size in SIZES:
        msgs = make_pool(codec, size)[:PER_ROUND] * 4
        # 64 messages a record, as PER_RECORD packs them, but at most 64 KiB a record.
        for k in (1, min(64, 65536 // size)):
            pairs = {name: Pair(name, mod, checksums=True) for name, mod in impls.items()}
            for pair in pairs.values():
                pair.warm(size * k)
            got: dict[str, list[float]] = {n: [] for n in pairs}
            got["codec only"] = []
            for _ in range(rounds):
                for name, pair in pairs.items():
                    got[name].append(per_hop(pair, codec, msgs, k))
                got["codec only"].append(per_codec(codec, msgs, k))
            base = statistics.median(got["py"])
            for name, xs in got.items():
                ratio = statistics.median(xs) / base
                print(f"| {size} | {k} | {name} | {summary(xs)} | {ratio:.2f} |")
            for pair in pairs.values():
                pair.get()
                pair.close()


def _pinned_child(role: str, cpu: int, name: str, so: str, size: int, n: int, out: Any) -> None:
    """One side of a pinned run: the producer encodes and puts, the consumer gets and decodes."""
    os.sched_setaffinity(0, {cpu})
    mod = load(Path(so)) if so else None
    pair = Pair("", mod, checksums=True, name=name)
    codec = Codec(PromptRequest)
    try:
        if role == "producer":
            msgs = make_pool(codec, size)
            encode, put = codec.encode_many, pair.put
            m = len(msgs)
            out.put("ready")
            for i in range(n):
                rec = encode([msgs[i % m]])
                while not put(rec):
                    pass
            return
        decode, get = codec.decode_many, pair.get
        out.put("ready")
        view = get()
        while view is None:
            view = get()
        t0 = time.perf_counter()
        decode(view)
        for _ in range(n - 1):
            view = get()
            while view is None:
                view = get()
            decode(view)
        out.put(n / (time.perf_counter() - t0))
        del view
    finally:
        pair.close(unlink=False)


def pinned_run(impl: str, so: str, size: int) -> float:
    ctx = mp.get_context("spawn")
    ring = Ring.create(CAPACITY, max_record=CAPACITY // 4)
    q: Any = ctx.Queue()
    try:
        kids = [
            ctx.Process(target=_pinned_child, args=(role, cpu, ring.name, so, size, PINNED_N, q))
            for role, cpu in (("consumer", 1), ("producer", 0))
        ]
        for kid in kids:
            kid.start()
        results = [q.get(timeout=60) for _ in range(3)]
        for kid in kids:
            kid.join(60)
        rate = [r for r in results if r != "ready"]
        return float(rate[0])
    finally:
        ring.close()
        ring.unlink()


def bench_pinned(paths: dict[str, str], rounds: int) -> None:
    print(f"\n## Two pinned processes, encode+put -> get+decode, {PINNED_N:,} msgs (msg/s)")
    print("| size B | impl | median | max | vs py |")
    print("|--:|:--|--:|--:|--:|")
    for size in SIZES:
        got: dict[str, list[float]] = {n: [] for n in paths}
        for _ in range(rounds):
            for impl, so in paths.items():
                got[impl].append(pinned_run(impl, so, size))
        base = statistics.median(got["py"])
        for impl, xs in got.items():
            med = statistics.median(xs)
            print(f"| {size} | {impl} | {med:,.0f} | {max(xs):,.0f} | {med / base:.2f} |")


def bench_replica(rounds: int, n: int = 20_000) -> None:
    """The real runner and rag stage (``bench.metrics_stage_cost``), metrics off, Python ring.

    With records of one message (a hop at low load) and of 64 (full load), so
    the ring's per-record cost above can be set against a replica's whole
    per-message cost.
    """
    import uvloop

    from bench import metrics_stage_cost as msc
    from mpipeline.codec import Packed, pack_records
    from mpipeline.config import PipelineConfig

    def one_per_record(encode: Any, msgs: list[Any], max_record: int) -> Packed[Any]:
        return Packed([(encode([m]), [m]) for m in msgs], [], [])

    print(f"\n## A rag replica (real StageRunner), {n:,} msgs, process CPU ns per message")
    print("| msgs per record | median | min |")
    print("|--:|--:|--:|")
    cfg = PipelineConfig()
    for k, packer in ((1, one_per_record), (64, pack_records)):
        setattr(msc, "pack_records", packer)  # noqa: B010 - a module global, for this run
        xs = []
        for r in range(rounds):
            run = f"rn{os.getpid()}{k}{r}"
            xs.append(uvloop.run(msc._consume("rag", n, cfg, False, run)) / n * 1e9)
        print(f"| {k} | {statistics.median(xs):,.0f} | {min(xs):,.0f} |")
    setattr(msc, "pack_records", pack_records)  # noqa: B010


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--pinned-rounds", type=int, default=3)
    ap.add_argument("--build-dir", type=Path, default=None)
    ap.add_argument("--xxh3-include", type=Path, default=None)
    ap.add_argument("--skip-pinned", action="store_true")
    ap.add_argument("--replica-rounds", type=int, default=3, help="0 skips the replica runs")
    args = ap.parse_args(argv)
    # native/ is not a package, and "build" is also a PyPI name: load it by path.
    native_build: Any = load(NATIVE / "build.py", "_ringcore_build")
    missing = native_build.can_build()
    if missing:
        print(f"cannot build the C core: {missing}", file=sys.stderr)
        return 1
    out = args.build_dir or Path(tempfile.mkdtemp(prefix="ringcore-"))
    paths = {"py": "", "c": str(native_build.build(out))}
    if args.xxh3_include is not None:
        so = native_build.build(out, xxh3_include=args.xxh3_include, name="ringcore_xxh3")
        paths["c+xxh3"] = str(so)
    impls = {name: (load(Path(p)) if p else None) for name, p in paths.items()}
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}, rounds {args.rounds}"
    )
    bench_calls(impls, args.rounds)
    bench_hops(impls, args.rounds)
    if args.replica_rounds:
        bench_replica(args.replica_rounds)
    if not args.skip_pinned:
        bench_pinned(paths, args.pinned_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())

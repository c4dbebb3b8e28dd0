"""Quick timeit comparison of msgspec Struct options for the ring codec.

Run: ``.venv/bin/python -m bench.codec_timeit``. Prints, per option set and
message, the record size and the best-of-5 time to encode one message and to
decode a record of 1 and of 64 messages. The pytest-benchmark twin with
statistics is ``bench/micro/test_codec.py``.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

import msgspec

from bench.micro._variants import BATCH, VARIANTS, build, samples

NUMBER = 20_000
REPEAT = 5


def best_ns(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number * 1e9


def main() -> None:
    encoder = msgspec.msgpack.Encoder()
    print(f"{'variant':11} {'message':10} {'bytes':>5} {'enc1':>8} {'dec1':>8} {'dec64/msg':>10}")
    for name, opts in VARIANTS.items():
        ns = build(**opts)
        for key, msg in samples(ns).items():
            edge: Any = ns.PromptRequest if key == "request" else ns.TokenChunk | ns.Completed
            decoder = msgspec.msgpack.Decoder(list[edge])
            one = encoder.encode([msg])
            many = encoder.encode([msg] * BATCH)
            enc1 = best_ns(partial(encoder.encode, [msg]), NUMBER)
            dec1 = best_ns(partial(decoder.decode, one), NUMBER)
            dec64 = best_ns(partial(decoder.decode, many), NUMBER // BATCH) / BATCH
            print(f"{name:11} {key:10} {len(one):5} {enc1:6.0f}ns {dec1:6.0f}ns {dec64:8.0f}ns")


if __name__ == "__main__":
    main()

"""Codec micro-benchmarks: the real messages, and msgspec's Struct options side by side.

Run: ``.venv/bin/pytest bench/micro/test_codec.py`` (add ``--benchmark-group-by=group``
to compare the options per message). ``scripts/test.sh`` runs this file once with
``--benchmark-disable`` as a smoke test.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.micro._variants import BATCH, VARIANTS, build, samples
from mpipeline import messages
from mpipeline.codec import Codec

REAL = samples(messages)
EDGES: dict[str, Any] = {
    "request": messages.ToRag,
    "chunk": messages.ToPost,
    "completed": messages.ToPost,
}


@pytest.mark.parametrize("kind", sorted(REAL))
def test_encode_one(benchmark: BenchmarkFixture, kind: str) -> None:
    codec: Codec[Any] = Codec(EDGES[kind])
    benchmark.group = f"encode 1 {kind}"
    record = benchmark(codec.encode, REAL[kind])
    assert codec.decode_one(record) == REAL[kind]


@pytest.mark.parametrize("kind", sorted(REAL))
def test_encode_batch(benchmark: BenchmarkFixture, kind: str) -> None:
    codec: Codec[Any] = Codec(EDGES[kind])
    batch = [REAL[kind]] * BATCH
    benchmark.group = f"encode {BATCH} {kind}"
    record = benchmark(codec.encode_many, batch)
    assert codec.decode_many(record) == batch


@pytest.mark.parametrize("kind", sorted(REAL))
def test_encode_into(benchmark: BenchmarkFixture, kind: str) -> None:
    codec: Codec[Any] = Codec(EDGES[kind])
    batch = [REAL[kind]] * BATCH
    scratch = bytearray()
    benchmark.group = f"encode {BATCH} {kind}"
    size = benchmark(codec.encode_into, batch, scratch)
    assert codec.decode_many(memoryview(scratch)[:size]) == batch


@pytest.mark.parametrize("kind", sorted(REAL))
def test_decode_one(benchmark: BenchmarkFixture, kind: str) -> None:
    codec: Codec[Any] = Codec(EDGES[kind])
    record = memoryview(codec.encode(REAL[kind]))
    benchmark.group = f"decode 1 {kind}"
    assert benchmark(codec.decode_one, record) == REAL[kind]


@pytest.mark.parametrize("kind", sorted(REAL))
def test_decode_batch(benchmark: BenchmarkFixture, kind: str) -> None:
    codec: Codec[Any] = Codec(EDGES[kind])
    record = memoryview(codec.encode_many([REAL[kind]] * BATCH))
    benchmark.group = f"decode {BATCH} {kind}"
    assert len(benchmark(codec.decode_many, record)) == BATCH


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["request", "chunk", "completed"])
def test_options_decode_batch(benchmark: BenchmarkFixture, kind: str, variant: str) -> None:
    """The measurement behind messages.py's array_like/gc choice (see codec.py)."""
    ns = build(**VARIANTS[variant])
    msg = samples(ns)[kind]
    edge: Any = ns.PromptRequest if kind == "request" else ns.TokenChunk | ns.Completed
    decoder = msgspec.msgpack.Decoder(list[edge])
    record = memoryview(msgspec.msgpack.encode([msg] * BATCH))
    benchmark.group = f"options: decode {BATCH} {kind}"
    assert len(benchmark(decoder.decode, record)) == BATCH


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kind", ["request", "chunk", "completed"])
def test_options_encode_one(benchmark: BenchmarkFixture, kind: str, variant: str) -> None:
    msg = samples(build(**VARIANTS[variant]))[kind]
    encoder = msgspec.msgpack.Encoder()
    benchmark.group = f"options: encode 1 {kind}"
    benchmark(encoder.encode, [msg])

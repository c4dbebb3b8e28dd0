"""The ``openai`` worker against a real model server, end to end.

The server is llama-cpp-python's OpenAI-compatible ``llama_cpp.server`` serving
the packaged Gemma 3 270M (tests/llama_server.py); the client is the official
``openai`` SDK talking to mpipeline's supervised gateway. So every hop is the
real thing: SDK -> gateway -> rag -> assemble -> inference shard -> httpx ->
llama.cpp -> back as SSE.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from mpipeline.config import OpenAIConfig, load
from tests.integration.conftest import (
    ConfigFactory,
    SupervisorFactory,
    SupervisorProcess,
    with_field,
)
from tests.llama_server import LlamaServer, llama_server, require_llama

pytestmark = pytest.mark.timeout(240)
__all__ = ["llama_server"]  # the fixture, imported to be used here


@pytest.fixture
def pipeline(start_supervisor: SupervisorFactory, llama_server: LlamaServer) -> SupervisorProcess:
    upstream = OpenAIConfig(
        base_url=llama_server.url, model=llama_server.model, api_key_env="", max_tokens=8
    )
    return start_supervisor(
        {
            "gateway.replicas": 1,
            "stages.inference.worker": "openai",
            "stages.inference.openai": upstream,
            "stages.inference.dedup.cache_entries": 0,
            # Room for a prompt longer than the model's context, to see it refused.
            **{f"stages.{s}.ring_capacity": 1 << 18 for s in ("rag", "assemble", "inference")},
        }
    )


def _sdk(url: str) -> openai.OpenAI:
    """The official client, used as a context manager by every test: an unclosed
    one leaves its keep-alive socket to the garbage collector, and pytest's
    final collection turns that ResourceWarning into a failed run."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_chat_completions_through_the_pipeline_with_the_openai_sdk(
    pipeline: SupervisorProcess,
) -> None:
    client = _sdk(pipeline.url)
    with client, pipeline.explain():
        reply = client.chat.completions.create(
            model="gemma",
            messages=[
                {"role": "system", "content": "You write short lists."},
                {"role": "user", "content": "Name three colours."},
            ],
            max_tokens=8,
        )
        text = reply.choices[0].message.content
        assert text and text.strip()
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
        assert reply.usage.prompt_tokens > 5

        stream = client.chat.completions.create(
            model="gemma",
            messages=[
                {"role": "user", "content": "Name three colours."},
                {"role": "assistant", "content": text},
                {"role": "user", "content": "And three animals?"},
            ],
            max_tokens=8,
            stream=True,
            user="session-1",
        )
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len([p for p in pieces if p]) >= 2, pieces
        assert "".join(pieces).strip()


def test_a_prompt_that_does_not_fit_the_models_context_is_a_clear_502(
    pipeline: SupervisorProcess,
) -> None:
    client = _sdk(pipeline.url)
    with client, pipeline.explain(), pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="gemma",
            messages=[{"role": "user", "content": "word " * 2200}],
            max_tokens=8,
        )
    # The server refuses it (400): not retried, no circuit counted, the client told why.
    assert info.value.status_code == 502
    assert "400" in str(info.value.message)


def test_a_local_model_shard_reuses_a_sessions_history_on_its_next_turn(
    start_supervisor: SupervisorFactory,
) -> None:
    """The ``llama_cpp`` worker inside a supervised shard: the second turn of a
    session lands on the shard that holds its KV state and evaluates only the
    new tokens (usage.prompt_tokens_details.cached_tokens)."""
    require_llama()
    sp = start_supervisor(
        {
            "gateway.replicas": 1,
            "stages.inference.worker": "llama_cpp",
            "stages.inference.replicas": 2,
            "stages.inference.llama_cpp.n_ctx": 1024,
            "stages.inference.llama_cpp.max_tokens": 8,
            "stages.inference.llama_cpp.session_cache_mib": 64,
        }
    )
    client = _sdk(sp.url)
    history: list[dict[str, str]] = []
    usages = []
    with client, sp.explain():
        for question in ("Tell me about the sea.", "And about mountains?", "And rivers?"):
            history.append({"role": "user", "content": question})
            reply = client.chat.completions.create(
                model="gemma",
                messages=history,  # type: ignore[arg-type]
                max_tokens=8,
                user="walker",
            )
            text = reply.choices[0].message.content or ""
            assert text.strip()
            history.append({"role": "assistant", "content": text})
            assert reply.usage is not None
            details = reply.usage.prompt_tokens_details
            assert details is not None and details.cached_tokens is not None
            usages.append(
                {"prompt_tokens": reply.usage.prompt_tokens, "cached_tokens": details.cached_tokens}
            )
    assert usages[0]["cached_tokens"] < usages[0]["prompt_tokens"], usages
    for before, after in zip(usages, usages[1:], strict=False):
        # Everything the previous turn evaluated (its prompt and its reply) is reused.
        assert after["cached_tokens"] >= before["prompt_tokens"], usages
        assert after["prompt_tokens"] - after["cached_tokens"] < 30, usages


def test_the_local_model_example_config_answers_through_the_gateway(
    start_supervisor: SupervisorFactory, configs: ConfigFactory
) -> None:
    """config/examples/local-model.toml as shipped (ports and run dir moved aside)."""
    require_llama()
    example = load(Path(__file__).parents[2] / "config" / "examples" / "local-model.toml")
    assert example.stages.inference.worker == "llama_cpp"
    assert (example.stages.inference.replicas, example.stages.inference.cores_per_replica) == (2, 1)
    cfg = example
    for key, value in {
        "run_dir": str(configs.run_dir),
        "gateway.port": 0,
        "metrics.port": 0,
        "supervisor.boot_timeout_s": 60.0,
    }.items():
        cfg = with_field(cfg, key, value)
    sp = start_supervisor(cfg)
    client = _sdk(sp.url)
    with client, sp.explain():
        reply = client.chat.completions.create(
            model="gemma",
            messages=[{"role": "user", "content": "Once upon a time"}],
            max_tokens=8,
        )
    assert (reply.choices[0].message.content or "").strip()
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8

"""config/examples/rag-and-redaction.toml: it validates and answers through the gateway."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from mpipeline.config import load
from tests.integration.conftest import ConfigFactory, SupervisorFactory, with_field

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "config" / "examples" / "rag-and-redaction.toml"


def test_the_example_names_a_shipped_corpus_relative_to_the_repository_root() -> None:
    example = load(EXAMPLE)
    documents = example.stages.rag.documents
    assert documents is not None and not Path(documents).is_absolute()
    # scripts/run.sh runs from the repository root, where the relative path resolves.
    assert sorted(p.name for p in (ROOT / documents).glob("*.md"))
    assert example.stages.assemble.budget_tokens > 0
    assert example.stages.post.redact.enabled
    assert example.stages.inference.worker == "echo"


def test_the_example_cites_and_redacts_through_the_gateway(
    start_supervisor: SupervisorFactory, configs: ConfigFactory
) -> None:
    """The example as shipped (ports, run dir and the corpus' absolute path moved in)."""
    cfg = load(EXAMPLE)
    documents = cfg.stages.rag.documents
    assert documents is not None
    for key, value in {
        "run_dir": str(configs.run_dir),
        "gateway.port": 0,
        "metrics.port": 0,
        # The supervisor's working directory is not the repository root here.
        "stages.rag.documents": str(ROOT / documents),
    }.items():
        cfg = with_field(cfg, key, value)
    sp = start_supervisor(cfg)
    client = openai.OpenAI(base_url=f"{sp.url}/v1", api_key="unused", max_retries=0)
    with client, sp.explain():
        reply = client.chat.completions.create(
            model="echo",
            messages=[
                {
                    "role": "user",
                    "content": "How does redaction work on a stream? Mail jane.doe@example.com",
                }
            ],
        )
    text = reply.choices[0].message.content or ""
    assert "jane.doe@example.com" not in text
    assert "[email]" in text
    assert "redaction" in text  # the rest of the echo is untouched
    assert reply.model_extra is not None
    sources = [c["source"] for c in reply.model_extra["citations"]]
    assert sources and sources[0] == "redaction.md"

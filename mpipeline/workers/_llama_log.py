"""llama.cpp's own log, through mpipeline's logging at DEBUG.

llama.cpp writes to stderr from C (building a context prints ~100 lines, and a
``llama_kv_cache_iswa: using full-size SWA cache`` warning got past
llama-cpp-python's filter into the supervisor's log, bypassing the log format
and the JSON shape). Its log callback hands every message to us instead:
lines become records of the ``mpipeline.workers.llama_cpp.native`` logger, so
they carry the replica's name, follow ``-v`` and the log format, and are
dropped unless debug logging is on. Errors stay visible, as warnings.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger("mpipeline.workers.llama_cpp.native")

# ggml_log_level in ggml.h (llama-cpp-python's own table predates DEBUG = 1).
GGML_LOG_LEVEL_ERROR = 4
GGML_LOG_LEVEL_CONT = 5

# The installed callback: ctypes frees a callback nothing references, and C
# would then call freed memory.
_installed: list[Any] = []


class NativeLog:
    """Joins llama.cpp's fragments (CONT messages, lines split across calls) into lines."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._logger = logger
        self._level = logging.DEBUG
        self._partial = ""

    def __call__(self, level: int, text: bytes | None) -> None:
        if level != GGML_LOG_LEVEL_CONT:
            self._level = logging.WARNING if level == GGML_LOG_LEVEL_ERROR else logging.DEBUG
        self._partial += (text or b"").decode("utf-8", errors="replace")
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            if line.strip():
                self._logger.log(self._level, "%s", line.rstrip())


def route(llama_cpp: Any) -> None:
    """Install the callback in this process (once; later calls do nothing)."""
    if _installed:
        return
    sink = NativeLog()

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
        sink(level, text)

    _installed.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

"""The session cache of the llama_cpp worker: evaluated KV states, LRU by bytes.

Kept apart from the worker because it is pure bookkeeping over token arrays and
byte strings: it needs neither llama.cpp nor a model, so its eviction and
prefix-matching rules are tested on their own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Tokens = npt.NDArray[np.intc]


def common_prefix(a: Tokens, b: Tokens) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass(frozen=True, slots=True)
class SessionState:
    """A sequence's KV state after evaluating ``tokens`` (llama.cpp's seq state bytes).

    Not llama-cpp-python's ``LlamaState``: that also copies ``scores``, one float
    per vocabulary entry per token (1 MiB per token with Gemma's 262k vocab),
    which sampling inside llama.cpp never reads.
    """

    tokens: Tokens
    data: bytearray

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.tokens.nbytes


class SessionCache:
    """LRU of ``SessionState`` by session id whose total ``nbytes`` stay within ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.nbytes = 0
        self._states: OrderedDict[str, SessionState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, session: object) -> bool:
        return session in self._states

    def put(self, session: str, state: SessionState) -> None:
        """Store ``state`` as the newest entry, evicting the oldest until it fits.

        A state larger than the whole limit is not kept (nor is the old one).
        """
        self.discard(session)
        if state.nbytes > self.limit:
            return
        while self.nbytes + state.nbytes > self.limit:
            _, old = self._states.popitem(last=False)
            self.nbytes -= old.nbytes
        self._states[session] = state
        self.nbytes += state.nbytes

    def discard(self, session: str) -> None:
        old = self._states.pop(session, None)
        if old is not None:
            self.nbytes -= old.nbytes

    def best(self, prompt: Tokens, session: str | None) -> tuple[SessionState | None, int]:
        """The state sharing the longest token prefix with ``prompt``, and that length.

        Ties go to the session's own state, then to the most recently used. The
        winner becomes the most recently used.
        """
        best: tuple[int, bool, int, str] | None = None
        for i, (key, state) in enumerate(self._states.items()):
            rank = (common_prefix(state.tokens, prompt), key == session, i, key)
            if rank[0] > 0 and (best is None or rank > best):
                best = rank
        if best is None:
            return None, 0
        self._states.move_to_end(best[3])
        return self._states[best[3]], best[0]

    def clear(self) -> None:
        self._states.clear()
        self.nbytes = 0


__all__ = ["SessionCache", "SessionState", "Tokens", "common_prefix"]

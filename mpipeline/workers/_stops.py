"""Stop sequences for the workers that generate text themselves (echo, llama_cpp).

A remote upstream applies ``stop`` on its side, which also stops it spending
tokens; a local worker must do the same as its text appears. The gateway used
to cut the text instead, after the model had generated (and billed) all of it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopScanner"]


class StopScanner:
    """Cuts streamed text at the first stop sequence, even one split across pieces.

    Holds back the last ``len(longest stop) - 1`` characters until it knows
    they do not start a stop sequence; ``stopped`` says a stop was found (the
    reply's finish reason is then "stop").
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._buf = ""
        self.stopped = False

    @property
    def active(self) -> bool:
        """Whether there is any stop sequence to look for."""
        return bool(self._stops)

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held back) that is safe to pass on."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._buf += text
        cut = min((i for s in self._stops if (i := self._buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            out, self._buf, self.stopped = self._buf[:cut], "", True
            return out
        keep = max(0, len(self._buf) - self._hold)
        out, self._buf = self._buf[:keep], self._buf[keep:]
        return out

    def flush(self) -> str:
        """What is still held back, once the text has ended without a stop."""
        out, self._buf = self._buf, ""
        return "" if self.stopped else out

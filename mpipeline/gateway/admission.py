"""Admission: may one request of a session go on, and if not, how long to wait and why.

The rate limits (``ratelimit.py``) are the gateway's, but every API style
(native REST, OpenAI, WebSocket) asks them on its own, once it has decoded a
body and knows the session, and answers a refusal in its own error shape. So
the styles are handed this object when they are built: a refusal goes from
here straight to the style's 429, without a detour through the gateway.
Asked before a request reaches the pipeline, a refusal costs no ring space
and is never dead-lettered.
"""

from __future__ import annotations

from dataclasses import dataclass

from mpipeline.config import RateLimitConfig
from mpipeline.gateway.ratelimit import Bucket, RateLimiter, retry_after_s


@dataclass(frozen=True, slots=True)
class Refused:
    """A request the rate limits turned away: the wait (whole seconds) and whose bucket."""

    retry_after_s: int
    bucket: Bucket

    @property
    def message(self) -> str:
        which = "this session's" if self.bucket == "session" else "the gateway's"
        return f"{which} rate limit is exhausted; retry in {self.retry_after_s} s"

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", str(self.retry_after_s)),)


class Admission:
    """The rate limits as the styles see them; with no limiter, everything goes on."""

    def __init__(self, limiter: RateLimiter | None, *, owned: bool = False) -> None:
        self._limiter = limiter
        # A limiter made for this gateway alone is closed with it.
        self._owned = owned

    @classmethod
    def for_gateway(cls, cfg: RateLimitConfig, limiter: RateLimiter | None) -> Admission:
        """``limiter`` (a replica's view of the supervisor's shared buckets), else
        private buckets when ``cfg`` enables limits, else none."""
        if limiter is None and cfg.enabled:
            return cls(RateLimiter.private(cfg), owned=True)
        return cls(limiter)

    def check(self, session: str | None) -> Refused | None:
        """None when a request of ``session`` may go on (its tokens are taken), else why not."""
        limiter = self._limiter
        if limiter is None:
            return None
        wait = limiter.acquire(session)
        if not wait:
            return None
        return Refused(retry_after_s(wait), limiter.refused_by)

    def close(self) -> None:
        """Release the buckets this gateway made for itself; from then on, no limits."""
        if self._owned and self._limiter is not None:
            self._limiter.close()
            self._limiter = None

"""The runner's one logger, and the ``extra=`` that ties a log record to a request.

Every part of the runner logs as ``mpipeline.runner`` (not per module): log
filters, the JSON log format's ``logger`` field and the tests that read it
name the runner, not how its code is split.
"""

from __future__ import annotations

import logging

from mpipeline.messages import Message, request_of

log = logging.getLogger("mpipeline.runner")


def about(msg: Message) -> dict[str, str]:
    """``extra=`` for a log record about one request: its id (logs.py prints it)."""
    req = request_of(msg)
    request_id = req.request_id if req is not None else getattr(msg, "request_id", None)
    return {"request_id": request_id} if request_id else {}

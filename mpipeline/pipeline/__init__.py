"""The client library: ``Pipeline`` (start or join a run, send requests, get outcomes).

``_client.py`` is the ``Pipeline`` class, ``_options.py`` the ``RequestOptions``
every entry point takes, ``_launch.py`` how a client gets a run (start a
supervisor or join one, claim a slot), ``_inflight.py`` the table that gives
every accepted request exactly one outcome.
"""

from __future__ import annotations

from mpipeline.pipeline._client import Pipeline
from mpipeline.pipeline._inflight import ClientMetrics
from mpipeline.pipeline._options import RequestFields, RequestOptions

__all__ = ["ClientMetrics", "Pipeline", "RequestFields", "RequestOptions"]

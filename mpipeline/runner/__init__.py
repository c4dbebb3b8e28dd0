"""StageRunner: everything around a stage, written once.

Reads its input rings in batches, decodes each record (a msgpack array of
messages) straight from shared memory, checks deadlines, stamps, calls the
stage, routes every output by session hash to the next stage's ring (or, in
the last stage, to the client named by ``reply_to``), and writes one record
per destination per batch. An exception in a message becomes a ``Failed``
for that request only; ``Failed`` messages go straight to the client's
error ring. Full rings follow the consuming stage's policy: ``block`` waits
up to the earliest deadline in the batch, ``shed`` fails the batch at once.

The parts, each in its module:

- ``StageRunner`` (``_runner.py``): the lifecycle (``attach``, ``run``,
  ``close``), one pump per input ring, admission (deadline and stamps) and
  dispatch, with a sync stage's ``process`` run inline;
- ``Outbox`` (``_outbox.py``): the output and error rings, the messages
  waiting for them, routing, records, and full rings (shed or block);
- ``TaskPool`` (``_pool.py``): an async stage's messages, started eagerly,
  run concurrently up to a limit with a priority backlog beyond it, swept
  for timeouts and client cancels;
- ``LocalLink`` and ``GroupRunner`` (``_chain.py``): a placement group's
  members in one process, each one's outputs handed to the next as objects;
- ``Meter`` (``_meter.py``): the counters, the heartbeat into the control
  block and the stage-duration histogram into the metrics block.

The runner imports rings, codec, messages, routing, topology, control and
metrics blocks, stages' base classes, config and errors: nothing that
supervises, serves or benchmarks.
"""

from __future__ import annotations

from mpipeline.runner._chain import GroupRunner, LocalLink
from mpipeline.runner._runner import StageRunner

__all__ = ["GroupRunner", "LocalLink", "StageRunner"]

"""The dead-letter queue: a durable, bounded record of every accepted request that failed.

The client promises each accepted request exactly one outcome; when that
outcome is an error (shed, expired, a stage error, a restarted replica,
shutdown, a cancelled or vanished client) the request itself would be lost
with it. So before the caller hears of the error, the request's payload and
the reason go to ``<run_dir>/dlq.jsonl``, from where an operator can list,
inspect and replay them (``mpipeline dlq``).

The parts, each with its own reasons:

* ``_records``: the entries (``dead`` records, ``claimed`` and ``replayed``
  markers), one self-describing JSON object per line, and the per-record cap
  that cuts an oversized record's texts and marks it, never drops it;
* ``_writer``: ``DeadLetterQueue``, group-committed appends ("recorded" means
  fsynced; see ``mpipeline._journal``) that rotate the file by size;
* ``_files``: the live and rotated files and the lock that orders appends,
  rotations and claims between processes;
* ``_reader``: reading every file back, oldest first, and joining records with
  their history;
* ``_query``: ``since`` filters and a record as JSON, for the CLI and the MCP tools;
* ``_claims``: how ``dlq replay`` takes records so that two replays at once
  never submit one twice.
"""

from __future__ import annotations

from mpipeline.dlq._claims import Claimed, claim
from mpipeline.dlq._files import DLQ_FILE, KEEP_FILES, MAX_FILE_BYTES, all_files
from mpipeline.dlq._query import as_json, parse_since
from mpipeline.dlq._reader import Listed, listing, read_entries
from mpipeline.dlq._records import (
    MAX_RECORD_BYTES,
    ChatPayload,
    ClaimMarker,
    DeadLetter,
    Entry,
    ReplayMarker,
    RequestPayload,
    ResultPayload,
    TurnPayload,
    gone_letter,
    letter_for,
)
from mpipeline.dlq._writer import DeadLetterQueue

__all__ = [
    "DLQ_FILE",
    "KEEP_FILES",
    "MAX_FILE_BYTES",
    "MAX_RECORD_BYTES",
    "ClaimMarker",
    "Claimed",
    "DeadLetter",
    "DeadLetterQueue",
    "Entry",
    "Listed",
    "ReplayMarker",
    "RequestPayload",
    "TurnPayload",
    "ChatPayload",
    "ResultPayload",
    "all_files",
    "as_json",
    "claim",
    "gone_letter",
    "letter_for",
    "listing",
    "parse_since",
    "read_entries",
]

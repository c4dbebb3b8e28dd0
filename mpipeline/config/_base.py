"""What the table modules of the config share: the bases, the field metadata, ring bounds.

Kept apart so that ``tables.py`` (the file's top and the stages),
``serving.py`` (supervisor, gateway, metrics) and ``workers.py`` (the
inference stage's worker tables) can use them without importing each other.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MIB = 1 << 20
GIB = 1 << 30
# Smaller rings hold too few records to be worth a segment.
RING_MIN_BYTES = 4096
# One segment above this is a typo; /dev/shm rarely holds it.
RING_MAX_BYTES = GIB
# Ring positions are 8-byte aligned single stores (RELIABILITY 2.5).
RING_ALIGN = 8

# The longest deadline of any request, in seconds: a client's own (deadline_ms,
# X-Request-Timeout) and the gateway's defaults alike. An hour covers a long
# reasoning stream; longer is almost always a unit mistake and would pin a slot.
MAX_DEADLINE_S = 3600

# What a field ending in ``_env`` must hold: the NAME of an environment variable.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_GE0 = Meta(ge=0)
_GE1 = Meta(ge=1)
_SECONDS = Meta(gt=0)
_DEADLINE = Meta(gt=0, le=MAX_DEADLINE_S)


def _doc(text: str, *examples: object) -> Meta:
    """A field's one text, for the JSON schema, ``config init`` and the docs alike.

    ``examples`` are what ``config init`` writes, commented out, for a field
    whose default is unset (TOML has no null), and what the schema offers editors.
    A line of ``text`` that starts with a space is kept as it is (a list); the
    rest is wrapped.
    """
    return Meta(description=text, examples=list(examples) if examples else None)


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every table: immutable, keyword-only, unknown keys rejected.

    A table's docstring is its comment in ``config init``'s file and its
    description in the schema, so it is written for the person editing the file.
    """


_RING = Meta(ge=RING_MIN_BYTES, le=RING_MAX_BYTES, multiple_of=RING_ALIGN)
Cpus = list[int] | Literal["auto"]
_CPUS = _doc(
    "Cores to pin to: a list of core ids (each within this process's CPU affinity), or "
    '"auto" to spread all replicas over the affinity mask in flow order.'
)


class PinnedConfig(_Table, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A set of replicas pinned to cores (the gateway and every stage)."""

    replicas: Annotated[int, _GE1, _doc("Processes running the stage.")] = 1
    cpus: Annotated[Cpus, _CPUS] = "auto"
    cores_per_replica: Annotated[
        int,
        _GE1,
        _doc('Cores each replica is pinned to, taken from cpus (or the mask for "auto").'),
    ] = 1

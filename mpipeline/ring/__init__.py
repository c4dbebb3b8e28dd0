"""The shared-memory SPSC ring (``Ring``) that carries every record between processes.

The public surface: ``Ring`` (``create``/``attach``, ``try_put``/``try_get``,
``put_many``/``get_many``, awaitable ``put``/``get``, ``stats``, ``close``,
``unlink``), ``RingStats``, and the layout constants (``_layout.py``) that
tests and tools read headers with. The ring imports nothing of mpipeline but
``_shm``, ``_doorbell`` and ``errors``.
"""

from __future__ import annotations

from mpipeline.ring import _layout
from mpipeline.ring._layout import *  # noqa: F403 - the layout's public names are the ring's
from mpipeline.ring._ring import Ring

__all__ = ["Ring", *_layout.__all__]

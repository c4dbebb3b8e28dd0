"""The gateway's file-descriptor budget: room for ``max_connections`` and a margin.

Every client connection is a descriptor, and a process out of descriptors
cannot accept anything: 20,600 idle WebSockets once took every client of a
replica down (issue 15). So the cap on connections (``max_connections``, 503
beyond it) must sit below the open-files limit, with room left for what the
replica itself opens (rings, the control block, the DLQ, logs, upstream
sockets). At start the gateway raises its soft ``RLIMIT_NOFILE`` as far as
the hard limit allows and, if that is still too low, lowers its cap to fit
and says so once.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("mpipeline.gateway")

# Descriptors kept for the replica's own files and upstream sockets.
RESERVED_FDS = 256


def connection_budget(max_connections: int) -> int:
    """Raise the soft open-files limit for ``max_connections``; the cap that fits.

    Never lowers a limit. The answer is ``max_connections`` unless the hard
    limit leaves less room, and at least 1.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + RESERVED_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as exc:
                log.warning("could not raise the open-files limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return max_connections
    fit = max(1, soft - RESERVED_FDS)
    log.warning(
        "gateway.max_connections=%d does not fit the open-files limit (%d, hard %s): "
        "capping connections at %d; raise it with `ulimit -n` or LimitNOFILE=",
        max_connections,
        soft,
        "unlimited" if hard == resource.RLIM_INFINITY else hard,
        fit,
    )
    return fit

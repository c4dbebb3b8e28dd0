"""The supervisor: ``mpipeline run`` in the foreground, owner of every process and segment.

``_supervisor.py`` is the loop (boot, watch, restart, drain, stop),
``_replicas.py`` one process slot and the restart policy, ``_segments.py``
the run's shared memory, ``_reload.py`` and ``_rolling.py`` live
reconfiguration (SIGHUP). ``main`` validates the config before anything
exists, then runs a ``Supervisor``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path

from mpipeline.errors import AlreadyRunning, ExitCode, MPipelineError
from mpipeline.supervisor._supervisor import Supervisor

log = logging.getLogger(__name__)

__all__ = ["Supervisor", "main"]


def main(
    config_path: Path | None = None,
    run_dir: Path | None = None,
    parent_pid: int | None = None,
    log_level: int = logging.INFO,
    overrides: Mapping[str, object] | None = None,
) -> int:
    """``mpipeline run``: validate, then supervise in the foreground until stopped.

    ``config_path`` None finds the file as every command does (``config.locate``),
    down to the built-in defaults; ``overrides`` (dotted field -> value) replace
    the file's values, as ``--port`` does.
    """
    from mpipeline import config as config_mod
    from mpipeline import logs
    from mpipeline.errors import ConfigError

    logs.setup(log_level, os.environ.get(logs.FORMAT_ENV, "auto"), stage="supervisor", replica=None)
    path = config_mod.locate(config_path)
    if path is None:
        log.info(
            "no config file (--config, $%s or ./%s): running on the built-in defaults",
            config_mod.CONFIG_ENV,
            config_mod.DEFAULT_PATH,
        )
    try:
        cfg = config_mod.load(path, overrides)
    except ConfigError as exc:
        log.error("invalid configuration:\n%s", exc)
        return int(ExitCode.USAGE)
    if cfg.gateway.replicas and cfg.gateway.auth_token_env:
        from mpipeline.auth import BearerAuth

        try:
            BearerAuth.from_env(cfg.gateway.auth_token_env)  # refuse before anything starts
        except ConfigError as exc:
            log.error("%s", exc)
            return int(ExitCode.USAGE)
    for warning in config_mod.warnings(cfg):
        log.warning("%s", warning)
    if parent_pid is not None:
        # Run on behalf of a Pipeline object: drain and exit when its process dies.
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            return int(ExitCode.FAILURE)
    try:
        # Replicas read the config from a file: the run's own when it is unchanged,
        # else the effective config, which the supervisor writes into the run dir.
        sup = Supervisor(cfg, None if overrides or path is None else path, run_dir)
        sup.reloader.set_source(path, overrides or {})
        return sup.run()
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return int(ExitCode.ALREADY_RUNNING)
    except MPipelineError as exc:
        log.error("%s", exc)
        return int(ExitCode.FAILURE)

"""Child bootstrap: the first code a spawned stage replica runs.

The only place that pins CPUs, builds an event loop or installs child signal
handlers. SIGINT is ignored (Ctrl-C reaches the whole process group; only
the supervisor decides what it means), SIGTERM sets an Event that drains the
runner, and PDEATHSIG makes the kernel kill us if the supervisor dies.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import psutil
import uvloop

from mpipeline import faults as faults_mod
from mpipeline import logs
from mpipeline.config import Catalog, PipelineConfig, load
from mpipeline.control import ControlBlock, ReplicaState
from mpipeline.errors import BootError, ExitCode
from mpipeline.metrics import Writer, attach_writer, stage_region
from mpipeline.runner import GroupRunner, LocalLink, StageRunner
from mpipeline.stages import STAGES, AsyncStage, Stage, StageContext
from mpipeline.topology import GroupSpec, ReplicaSpec
from mpipeline.workers import served_upstream_names

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl: then we were reparented already.
    if os.getppid() != parent:
        os._exit(ExitCode.FAILURE)


def main(
    spec: ReplicaSpec | GroupSpec, config_path: str, ctl_name: str, parent: int, log_level: int
) -> None:
    """Entry point of a replica process (the spawn target)."""
    run_child(
        spec.name,
        spec.cpus,
        config_path,
        parent,
        log_level,
        lambda cfg: _serve(spec, cfg, ctl_name),
    )


def run_child(
    name: str,
    cpus: tuple[int, ...],
    config_path: str,
    parent: int,
    log_level: int,
    serve: Callable[[PipelineConfig], Coroutine[Any, Any, None]],
) -> NoReturn:
    """Boot any supervised child (stage or gateway) and run ``serve`` on uvloop; exits.

    Exit codes tell the supervisor what happened: BOOT_ERROR (3) stops the run
    instead of a restart loop, FAILURE (1) is a crash to restart.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A hangup is the supervisor's to answer (a reload); a rag replica handles its own.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The supervisor blocks signals while it spawns; unblock now that INT is ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    _die_with_parent(parent)
    # The format comes through the environment the CLI set before spawning;
    # logs.setup also quiets httpx/httpcore, whose URLs may carry a key (RELIABILITY 9).
    logs.setup(
        log_level,
        os.environ.get(logs.FORMAT_ENV, "auto"),
        stage=name.rpartition("-")[0] or name,
        replica=name,
    )
    try:
        cfg = load(Path(config_path))
        if cpus:
            psutil.Process().cpu_affinity(list(cpus))
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(cfg))
    except BootError as exc:
        log.error("failed to boot: %s", exc)
        sys.exit(ExitCode.BOOT_ERROR)
    except Exception:  # the top-level crash logger: anything else is a crash
        log.exception("crashed")
        sys.exit(ExitCode.FAILURE)
    sys.exit(ExitCode.OK)


def build_stage(
    spec: ReplicaSpec, cfg: PipelineConfig, segments: str = "", metrics: Writer | None = None
) -> Stage[Any, Any] | AsyncStage[Any, Any]:
    ctx = StageContext(
        stage=spec.stage,
        replica=spec.index,
        replicas=spec.replicas,
        config=cfg,
        segments=segments,
        cpus=spec.cpus,
        metrics=metrics,
    )
    cls = STAGES[spec.stage]
    stage = cls(getattr(cfg.stages, spec.stage), ctx)
    assert isinstance(stage, Stage | AsyncStage)
    return stage


def _metrics_writer(spec: ReplicaSpec, cfg: PipelineConfig, segments: str) -> Writer | None:
    """This replica's region of the run's metrics block (None when metrics are off)."""
    if not cfg.metrics.enabled:
        return None
    names = served_upstream_names(Catalog.of(cfg)) if spec.stage == "inference" else []
    region = stage_region(spec.stage, spec.name, spec.outputs, names)
    return attach_writer(segments, spec.slot, region)


async def _serve(spec: ReplicaSpec | GroupSpec, cfg: PipelineConfig, ctl_name: str) -> None:
    """Boot the stage (or each member of a placement group), report ready, run, stop."""
    members = spec.members if isinstance(spec, GroupSpec) else (spec,)
    ctl = ControlBlock.attach(ctl_name)
    for member in members:
        ctl.booting(member.slot, os.getpid())
    stages: list[Stage[Any, Any] | AsyncStage[Any, Any]] = []
    try:
        segments = ctl_name.removesuffix("-control")
        # Built last member first: each earlier one hands its outputs to the next.
        runners: list[StageRunner] = []
        for member in reversed(members):
            # In a group, say which member failed: the process is named after the group.
            about = f"{member.name}: " if len(members) > 1 else ""
            faults = faults_mod.for_stage(member.stage)
            if faults.boot_error:
                raise BootError(f"{about}injected boot_error fault")
            metrics = _metrics_writer(member, cfg, segments)
            stage = build_stage(member, cfg, segments, metrics)
            if faults.any:
                stage = faults_mod.wrap(stage, faults)
            await stage.start()
            stages.append(stage)
            link = None
            if runners:
                after = runners[0]
                link = LocalLink(after.entry(), after.outbox, after.meter, timed=after.pool is None)
            runner = StageRunner(member, cfg, stage, ctl, metrics, sink=link)
            if runners:
                runner.pools += runners[0].pools
            runners.insert(0, runner)
        group = GroupRunner(runners)
        group.attach()
    except BootError:
        await _stop_stages(stages)
        raise
    except Exception as exc:
        await _stop_stages(stages)
        raise BootError(f"{type(exc).__name__}: {exc}") from exc
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    for member in members:
        ctl.set_state(member.slot, ReplicaState.READY)
    log.debug("ready on cpus %s", list(spec.cpus))
    try:
        await (group.run(stop) if len(runners) > 1 else runners[0].run(stop))
    finally:
        for member in members:
            ctl.set_state(member.slot, ReplicaState.EXITED)
        await _stop_stages(stages)
        group.close()
        ctl.close()


async def _stop_stages(stages: list[Stage[Any, Any] | AsyncStage[Any, Any]]) -> None:
    for stage in stages:
        await stage.stop()

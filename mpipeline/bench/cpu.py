"""CPU accounting for ``mpipeline bench``: per process, and the noise from everyone else."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import msgspec
import psutil


class ProcessCpu(msgspec.Struct, frozen=True, kw_only=True):
    """CPU one process used during a phase; 100 % is one core busy all the time."""

    name: str
    pid: int
    percent: float
    cpus: list[int]


class CpuMeter:
    """CPU time of named processes, and of everything else on ``cores``, over a phase.

    The second number flags a noisy machine: CPU that other processes took
    from the cores under test is capacity the pipeline did not get.
    """

    def __init__(self, pids: Mapping[str, int], cores: list[int]) -> None:
        self._procs = {}
        for name, pid in pids.items():
            try:
                self._procs[name] = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
        self._cores = cores
        self._before: dict[str, float] = {}
        self._busy0 = 0.0
        self._t0 = 0.0

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    def _busy(self) -> float:
        per_cpu = psutil.cpu_times(percpu=True)
        busy = 0.0
        for core in self._cores:
            if core < len(per_cpu):
                t = per_cpu[core]
                busy += sum(t) - t.idle - getattr(t, "iowait", 0.0)
        return busy

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._busy0 = self._busy()
        self._before = {}
        for name, proc in self._procs.items():
            try:
                self._before[name] = self._cpu(proc)
            except psutil.NoSuchProcess:
                continue

    def stop(self) -> tuple[list[ProcessCpu], float]:
        """Per-process use, and what other processes used on the cores (% of one core)."""
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy = 100.0 * (self._busy() - self._busy0) / wall
        out = []
        for name, proc in self._procs.items():
            try:
                used = self._cpu(proc) - self._before[name]
                cpus = sorted(proc.cpu_affinity() or [])
            except (psutil.NoSuchProcess, KeyError):
                continue
            out.append(ProcessCpu(name=name, pid=proc.pid, percent=100.0 * used / wall, cpus=cpus))
        return out, max(0.0, busy - sum(p.percent for p in out))


def pin(cpus: list[int]) -> Callable[[], None]:
    """Pin this process to ``cpus``; return the function that restores the old mask."""
    before = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus)
    return lambda: os.sched_setaffinity(0, before)

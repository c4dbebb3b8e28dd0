"""``mpipeline profile``: sample one running replica with py-spy, from outside it.

py-spy reads the replica's memory (``process_vm_readv``, which needs ptrace
access), so the replica runs unmodified and is never restarted; the price is
that the kernel must allow the attach (RELIABILITY 2.7). When it does not,
this says which setting refused it and how to change it. Either way the
pipeline is only read: the replica's pid comes from the control block through
``rundir.connect``, and nothing is written to it or to any ring.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from mpipeline import _shm, rundir
from mpipeline.control import ReplicaState
from mpipeline.errors import ConfigError, ExitCode, MPipelineError

PY_SPY = "py-spy"
PR_SET_PDEATHSIG = 1
INSTALL_HINT = f"install it with `{sys.executable} -m pip install py-spy`"
YAMA_PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
PROC_SELF_STATUS = Path("/proc/self/status")
CAP_SYS_PTRACE = 19  # bit in CapEff (linux/capability.h)
DEFAULT_DURATION_S = 10
DEFAULT_RATE_HZ = 100
DEFAULT_LIMIT = 20
# py-spy stops by itself after --duration; this is slack for attaching and writing.
EXIT_GRACE_S = 30.0
# What py-spy prints when the kernel refuses the attach: its own hint as a
# non-root user, the raw errno as root without CAP_SYS_PTRACE, or its docker hint.
_REFUSED = re.compile(
    r"permission denied|operation not permitted|SYS_PTRACE|os error (?:1|13)\b", re.IGNORECASE
)
# inferno's error when every sample was idle (py-spy records on-CPU stacks only).
_NO_SAMPLES = "No stack counts found"
_SAMPLES = re.compile(r"Samples: (\d+) Errors: (\d+)")
_SCOPE_MEANING = {
    0: "classic: any process of the same user may attach",
    1: "restricted: only an ancestor of the target may attach",
    2: "admin-only: only processes with CAP_SYS_PTRACE may attach",
    3: "no attach at all, until reboot",
}
_PROFILABLE = (ReplicaState.BOOTING, ReplicaState.READY, ReplicaState.DRAINING)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    pid: int


@dataclass(frozen=True, slots=True)
class Sampling:
    """How py-spy samples: seconds, rate, and whether idle or paused stacks count."""

    duration: int = DEFAULT_DURATION_S
    rate: int = DEFAULT_RATE_HZ
    idle: bool = False
    nonblocking: bool = False


@dataclass(frozen=True, slots=True)
class Hot:
    """One function of a ``--top`` summary: samples where it ran / was on the stack."""

    function: str
    own: int
    total: int


# Finding the replica and py-spy


def resolve(run: rundir.Run, name: str) -> Target:
    """Map ``STAGE`` (replica 0) or ``STAGE-N`` to the replica's current pid.

    :raises ConfigError: when no replica has that name (the CLI exits 2).
    :raises MPipelineError: when the replica is down, e.g. between restarts.
    """
    topo = run.info.topology
    slots = {r.name: r.slot for r in topo.replicas}
    # Gateway replicas beat in the control block like stages and are profiled alike.
    slots.update({g.name: g.slot for g in topo.gateways})
    stages = {full.rsplit("-", 1)[0] for full in slots}
    full = f"{name}-0" if name in stages else name
    if full not in slots:
        raise ConfigError(f"no replica named {name!r}; replicas: {', '.join(slots)}")
    pid = run.control.pid(slots[full])
    state = run.control.replica_state(slots[full])
    if state not in _PROFILABLE or not _shm.process_alive(pid, 0):
        raise MPipelineError(f"replica {full} is not running now (restarting?); try again")
    return Target(full, pid)


def find_py_spy() -> str:
    """py-spy beside this interpreter (the venv's), else on PATH.

    :raises MPipelineError: when neither has it, saying how to install it.
    """
    beside = Path(sys.executable).parent / PY_SPY
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(PY_SPY)
    if found is None:
        raise MPipelineError(f"py-spy is not installed; {INSTALL_HINT}")
    return found


# ptrace permission


def ptrace_scope() -> int | None:
    """Yama's ``kernel.yama.ptrace_scope``, or None when Yama is not enabled."""
    try:
        return int(YAMA_PTRACE_SCOPE.read_text())
    except (OSError, ValueError):
        return None


def has_cap_sys_ptrace() -> bool:
    try:
        text = PROC_SELF_STATUS.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    return False


def preflight() -> str | None:
    """Why an attach is certain to be refused here, or None if it may work."""
    scope = ptrace_scope()
    if scope is not None and scope >= 3:
        return "kernel.yama.ptrace_scope is 3: no process may attach until the next reboot"
    if scope == 2 and not has_cap_sys_ptrace():
        return "kernel.yama.ptrace_scope is 2 and this process lacks CAP_SYS_PTRACE"
    return None


def refusal(target: Target, why: str) -> str:
    """The error for a refused attach: what refused it, here, and the ways to allow it."""
    scope = ptrace_scope()
    setting = (
        "Yama is not enabled"
        if scope is None
        else f"kernel.yama.ptrace_scope = {scope} ({_SCOPE_MEANING.get(scope, 'unknown')})"
    )
    cap = "present" if has_cap_sys_ptrace() else "missing"
    return (
        f"cannot profile {target.name} (pid {target.pid}): ptrace was refused: {why}\n"
        f"  here: {setting}; CAP_SYS_PTRACE {cap}{' (in a container)' if _in_container() else ''}\n"
        "allow it with one of:\n"
        "  - sudo sysctl kernel.yama.ptrace_scope=0   (Yama; scope 3 needs a reboot; persist it\n"
        "    in /etc/sysctl.d/10-ptrace.conf)\n"
        "  - give the profiler CAP_SYS_PTRACE: run `mpipeline profile` as root (sudo)\n"
        "  - in a container: docker run --cap-add SYS_PTRACE ...  (Kubernetes:\n"
        "    securityContext.capabilities.add: [SYS_PTRACE])\n"
        "the pipeline was not touched."
    )


def _in_container() -> bool:
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return True
    try:
        cgroup = Path("/proc/1/cgroup").read_text()
    except OSError:
        return False
    return any(word in cgroup for word in ("docker", "kubepods", "containerd", "libpod"))


# Running py-spy


def record(py_spy: str, target: Target, output: Path, fmt: str, how: Sampling) -> int:
    """Run ``py-spy record`` into ``output``; return the number of samples.

    :raises MPipelineError: when py-spy fails; a refused attach names
        ptrace_scope and CAP_SYS_PTRACE.
    """
    cmd = [py_spy, "record", "--pid", str(target.pid), "--duration", str(how.duration)]
    cmd += ["--rate", str(how.rate), "--format", fmt, "--output", str(output)]
    if fmt == "raw":
        cmd.append("--nolineno")
    if how.idle:
        cmd.append("--idle")
    if how.nonblocking:
        cmd.append("--nonblocking")
    limit = how.duration + EXIT_GRACE_S
    # A file, not a pipe: wait() can be interrupted by Ctrl-C and simply called again.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=_stop_with(os.getpid(), ctypes.CDLL(None, use_errno=True)),
        )
        try:
            try:
                proc.wait(limit)
            except KeyboardInterrupt:
                # Ctrl-C: py-spy stops sampling and still writes what it has.
                proc.send_signal(signal.SIGINT)
                proc.wait(EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise MPipelineError(f"py-spy did not finish within {limit:.0f}s") from None
        log.seek(0)
        text = log.read()
    if proc.returncode == 0:
        found = _SAMPLES.search(text)
        return int(found.group(1)) if found else 0
    if fmt == "flamegraph" and _NO_SAMPLES in text:
        output.unlink(missing_ok=True)  # py-spy leaves an empty, invalid SVG
        return 0
    if not _shm.process_alive(target.pid, 0):
        raise MPipelineError(f"replica {target.name} (pid {target.pid}) exited while sampled")
    said = _error_text(text) or f"exit {proc.returncode}"
    if _REFUSED.search(said):
        raise MPipelineError(refusal(target, said.replace("\n", " ")))
    raise MPipelineError(f"py-spy failed on {target.name} (pid {target.pid}):\n{said}")


def _stop_with(parent: int, libc: ctypes.CDLL) -> Callable[[], None]:
    """Runs in the forked child: if we die (a script's SIGTERM, a kill), py-spy gets SIGINT,
    which makes it stop sampling and still write its output, instead of running on."""

    def child() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return child


def _error_text(text: str) -> str:
    """py-spy's error without its progress lines and its Rust backtrace."""
    text = text.split("Stack backtrace:", 1)[0]
    return "\n".join(
        line for line in text.strip().splitlines() if line and not line.startswith("py-spy>")
    )


def summarise(collapsed: str) -> tuple[int, list[Hot]]:
    """Own and total samples per function from py-spy's raw (collapsed) format."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):  # recursion counts once
            total[frame] += n
    hot = [Hot(f, own[f], total[f]) for f in total]
    hot.sort(key=lambda h: (-h.own, -h.total, h.function))
    return samples, hot


def render_top(target: Target, samples: int, hot: list[Hot], limit: int, idle: bool) -> str:
    which = "all stacks" if idle else "on-CPU stacks only; --idle adds waiting ones"
    lines = [f"{target.name} (pid {target.pid}): {samples} samples ({which})", ""]
    lines.append(f"{'%OWN':>6}  {'%TOTAL':>6}  FUNCTION (FILE)")
    lines += (
        f"{100 * h.own / samples:6.1f}  {100 * h.total / samples:6.1f}  {h.function}"
        for h in hot[:limit]
    )
    return "\n".join(lines)


def _idle_hint(target: Target, how: Sampling) -> str:
    return (
        f"no samples: {target.name} (pid {target.pid}) was idle for all {how.duration}s "
        "(py-spy records on-CPU stacks only); put load on the pipeline "
        "(scripts/profile.sh does) or add --idle to include waiting stacks"
    )


def main(
    name: str,
    run_dir: Path | None,
    config: Path | None,
    how: Sampling,
    *,
    output: Path | None = None,
    top: bool = False,
    limit: int = DEFAULT_LIMIT,
    out: TextIO,
    err: TextIO,
) -> int:
    """``mpipeline profile``: 0 on a profile, 2 for an unknown replica, 1 for anything else."""
    try:
        where = rundir.find_run_dir(run_dir, config)
        with rundir.connect(where) as run:
            target = resolve(run, name)
        py_spy = find_py_spy()
        why = preflight()
        if why is not None:
            raise MPipelineError(refusal(target, why))
        if top:
            out.write(_top(py_spy, target, output, how, limit, err) + "\n")
            return int(ExitCode.OK)
        if output is None:
            output = Path(f"profile-{target.name}-{time.strftime('%Y%m%d-%H%M%S')}.svg")
        _start(output, target, how, err)
        samples = record(py_spy, target, output, "flamegraph", how)
    except ConfigError as exc:
        err.write(f"mpipeline profile: {exc}\n")
        return int(ExitCode.USAGE)
    except MPipelineError as exc:
        err.write(f"mpipeline profile: {exc}\n")
        return int(ExitCode.FAILURE)
    if not output.exists():
        err.write(f"mpipeline profile: {_idle_hint(target, how)}\n")
        return int(ExitCode.FAILURE)
    out.write(f"{output}: flamegraph of {target.name}, {samples} samples\n")
    return int(ExitCode.OK)


def _top(
    py_spy: str, target: Target, output: Path | None, how: Sampling, limit: int, err: TextIO
) -> str:
    with tempfile.TemporaryDirectory(prefix="mpipeline-profile-") as tmp:
        # --output with --top keeps the collapsed stacks (flamegraph.pl, speedscope read them).
        raw = output if output is not None else Path(tmp) / f"{target.name}.txt"
        _start(raw, target, how, err)
        record(py_spy, target, raw, "raw", how)
        samples, hot = summarise(raw.read_text() if raw.exists() else "")
    if samples == 0:
        return _idle_hint(target, how)
    return render_top(target, samples, hot, limit, how.idle)


def _start(output: Path, target: Target, how: Sampling, err: TextIO) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MPipelineError(f"cannot create {output.parent}: {exc.strerror}") from None
    if not os.access(output.parent, os.W_OK):
        raise MPipelineError(f"cannot write {output}: {output.parent} is not writable")
    err.write(f"sampling {target.name} (pid {target.pid}) for {how.duration}s at {how.rate} Hz\n")

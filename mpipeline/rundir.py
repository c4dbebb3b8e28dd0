"""The run directory: its file names, its typed ``state.json``, its lock, and joining a run.

One directory per pipeline holds what outlives a process: the supervisor's
``flock``ed lock file (pid inside), ``state.json`` (what a client, a gateway
replica or ``mpipeline status`` needs to join the run: segment names,
topology, URLs), the client slots' lock files and the dead-letter queue.

``state.json`` is a contract between processes, so it is a msgspec Struct
(``RunInfo``) with one shape for everyone: the supervisor builds it before it
spawns anything, hands it to gateway replicas at spawn (``state.json`` only
appears once every replica is ready), and writes it atomically
(write-then-rename) when the run is up. Readers decode it, never pick a dict
apart by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

from mpipeline.config import DEFAULT_PATH, BreakerConfig, PipelineConfig, load, locate
from mpipeline.control import ControlBlock
from mpipeline.errors import AlreadyRunning, MPipelineError, RingCorrupted, RingNotFound
from mpipeline.topology import Topology

STATE_FILE = "state.json"
LOCK_FILE = "supervisor.lock"
# What a run without an unchanged config file of its own gives its replicas to read.
EFFECTIVE_CONFIG = "effective.toml"
DEFAULT_CONFIG = DEFAULT_PATH
PROC_LOCKS = Path("/proc/locks")
DIR_MODE = 0o700
FILE_MODE = 0o600


class RunInfo(msgspec.Struct, frozen=True, kw_only=True):
    """``state.json``: a live run as its supervisor publishes it."""

    # The supervisor's pid (whose flock guards the directory).
    pid: int
    run_id: str
    run_dir: str
    # The config file the run was started with (absolute).
    config: str
    # Shared segments of the run: the control block always; the rest when in use.
    control: str
    ratelimit: str | None = None
    breakers: str | None = None
    # The breakers' settings (a reader needs them to interpret the board).
    breaker_config: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    metrics: str | None = None
    gateway_url: str | None = None
    metrics_url: str | None = None
    # Upstream names of the inference worker (the breakers' and metrics' labels).
    upstreams: list[str] = []
    topology: Topology


class _Head(msgspec.Struct):
    """The part of ``state.json`` that says whose it is, read before trusting the rest."""

    pid: int
    control: str


_DECODE_HEAD = msgspec.json.Decoder(_Head)
_DECODE = msgspec.json.Decoder(RunInfo)
_ENCODE = msgspec.json.Encoder()


# Where


def resolve_run_dir(cfg: PipelineConfig) -> Path:
    """``run_dir``, else ``<base>/<run_dir_name(cfg)>``.

    The base is ``$XDG_RUNTIME_DIR/mpipeline``, or ``/tmp/mpipeline-<uid>``
    without it. One directory per pipeline, not per user: two pipelines of one
    user (two ports, two names) keep their lock, state and DLQ apart.
    """
    if cfg.run_dir:
        return Path(cfg.run_dir).expanduser()
    return base_dir() / run_dir_name(cfg)


def run_dir_name(cfg: PipelineConfig) -> str:
    """``name``, else ``port-<gateway.port>``, else ``default`` (no fixed port).

    Keyed by the port because two pipelines on one port cannot run at once
    anyway; ``name`` separates any two.
    """
    if cfg.name:
        return cfg.name
    if cfg.gateway.replicas and cfg.gateway.port:
        return f"port-{cfg.gateway.port}"
    return "default"


def find_run_dir(run_dir: Path | None, config: Path | None) -> Path:
    """``--run-dir`` if given, else the run dir of the config ``mpipeline run`` would
    use: ``--config``, else ``$MPIPELINE_CONFIG``, else the default file, else the
    built-in defaults (``config.locate``).

    :raises ConfigError: when the config file named is invalid or missing.
    """
    if run_dir is not None:
        return run_dir
    path = locate(config)
    return resolve_run_dir(load(path) if path is not None else PipelineConfig())


def base_dir() -> Path:
    """Where default run dirs go: ``$XDG_RUNTIME_DIR/mpipeline`` or ``/tmp/mpipeline-<uid>``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "mpipeline" if runtime else Path(f"/tmp/mpipeline-{os.getuid()}")


def make(run_dir: Path) -> None:
    """Create ``run_dir`` and its missing parents, each 0700 whatever the umask; check it.

    :raises MPipelineError: when the directory is not safe to use (see ``check``)
    """
    create(run_dir)
    check(run_dir)


def create(path: Path) -> None:
    """Make the missing directories of ``path``, each 0700 whatever the umask."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile: check() decides
            os.mkdir(directory, DIR_MODE)
            _own_mode(directory, DIR_MODE)


def check(run_dir: Path) -> None:
    """Refuse a run dir another local user could control.

    The run dir holds request payloads (the DLQ) and files the supervisor
    writes and ``status``/``dlq replay`` trust (``state.json``): it must be a
    real directory (not a symlink), owned by this user and closed to others
    (0700), and so must the default base it sits in (``/tmp`` is shared).

    :raises MPipelineError: naming the path, what is wrong and the fix
    """
    base = base_dir()
    for path in (base, run_dir) if base in run_dir.parents else (run_dir,):
        problem = _unsafe(path)
        if problem:
            raise MPipelineError(
                f"refusing the run dir {run_dir}: {path} {problem}. Another local user could "
                "read or replace its files. Remove it and let mpipeline create it, or set "
                "run_dir (or --run-dir) to a directory of your own with mode 0700"
            )


def _unsafe(path: Path) -> str | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):o}, open to other users"
    return None


def _own_mode(path: Path, mode: int) -> None:
    """``chmod`` through a descriptor opened without following links (never a planted one)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def open_private(path: Path, flags: int) -> int:
    """Open (or create, 0600) a file of ours in a checked run dir, never through a link.

    :raises MPipelineError: when ``path`` is not a regular file of this user's
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise MPipelineError(f"{path} is not a regular file of this user; refusing it")
        # The creation mode is filtered by the umask (and ignored for an old file).
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


# The lock


class RunLock:
    """The supervisor's exclusive ``flock`` on ``run_dir/supervisor.lock``.

    A flock, not a pidfile: the kernel drops it when the holder dies, so a
    SIGKILLed supervisor never leaves a stale lock (RELIABILITY 2.8).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock and write our pid into it.

        :raises AlreadyRunning: naming the holder, and what to do instead
        """
        make(self.run_dir)
        fd = open_private(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(
                f"another supervisor is already running in {self.run_dir} (pid {other}). "
                "To run a second pipeline beside it, give this one its own run dir: "
                "--run-dir DIR, or `name` or `run_dir` in the config. To use the running "
                f"one from Python: Pipeline.attach({str(self.run_dir)!r})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def lock_holder(run_dir: Path) -> int | None:
    """Pid holding the supervisor's flock on ``run_dir``, read from /proc/locks (no locking)."""
    path = run_dir / LOCK_FILE
    try:
        inode = path.stat().st_ino
        written = path.read_text().strip()
        table = PROC_LOCKS.read_text()
    except OSError:
        return None
    for line in table.splitlines():
        parts = line.split()
        # "1: FLOCK ADVISORY WRITE <pid> <maj>:<min>:<inode> 0 EOF"; waiters have "->".
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        pid, where = parts[4], parts[5]
        if where.rsplit(":", 1)[-1] == str(inode) and pid == written:
            return int(pid)
    return None


# state.json


def write_state(info: RunInfo) -> None:
    """Publish ``info`` as ``state.json`` in its run dir, atomically."""
    write_atomically(Path(info.run_dir) / STATE_FILE, _ENCODE.encode(info))


def write_atomically(path: Path, data: bytes, *, durable: bool = False) -> None:
    """A new file (never through a link, never an old one), 0600, renamed into place
    so that readers see all of it or none; ``durable`` fsyncs it before the rename.

    The temporary name is random, so that two writers of one process (two
    gateway tasks, say) never share one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_config(run_dir: Path, text: str) -> Path:
    """Write ``EFFECTIVE_CONFIG`` into ``run_dir`` (0600, atomically); return its path."""
    path = run_dir / EFFECTIVE_CONFIG
    write_atomically(path, text.encode())
    return path


def remove_state(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (run_dir / STATE_FILE).unlink()


def read_state(run_dir: Path) -> RunInfo | None:
    """The published state, or None while there is none (not started, or still booting).

    :raises MPipelineError: when the file cannot be read or is not a run's state
    """
    try:
        data = (run_dir / STATE_FILE).read_bytes()
    except FileNotFoundError:
        return None
    return decode_state(data, run_dir)


def decode_state(data: bytes, run_dir: Path) -> RunInfo:
    """:raises MPipelineError: when ``data`` is not a run's state"""
    try:
        return _DECODE.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MPipelineError(f"cannot read {run_dir / STATE_FILE}: {exc}") from None


# Joining a live run, read-only


@dataclass(frozen=True, slots=True)
class Run:
    """A live supervisor's published state plus an attached (read-only) control block."""

    run_dir: Path
    info: RunInfo
    control: ControlBlock


@contextlib.contextmanager
def connect(run_dir: Path) -> Iterator[Run]:
    """Attach to the supervisor running in ``run_dir`` (for status, top, profile, /metrics).

    Nothing here claims a ring side, takes a lock or writes a byte.

    :raises MPipelineError: naming the reason when none is running there (or
        it is still starting), so the CLI can print it and exit 1.
    """
    where = f"in {run_dir}"
    if not os.path.lexists(run_dir):
        raise MPipelineError(f"no supervisor is running {where}: the directory does not exist")
    check(run_dir)
    try:
        data = (run_dir / STATE_FILE).read_bytes()
    except FileNotFoundError:
        holder = lock_holder(run_dir)
        if holder is not None:
            raise MPipelineError(
                f"the supervisor {where} (pid {holder}) is still starting; try again shortly"
            ) from None
        raise MPipelineError(
            f"no supervisor is running {where} (no {STATE_FILE}); start one with "
            "`mpipeline run`, or point at another with --run-dir/--config"
        ) from None
    except PermissionError:
        raise _other_user(where) from None
    except OSError as exc:
        raise MPipelineError(f"cannot read {run_dir / STATE_FILE}: {exc}") from None
    # Whose it is first: a killed supervisor's file (maybe of an older version)
    # must say "gone", not fail to decode.
    try:
        head = _DECODE_HEAD.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MPipelineError(f"cannot read {run_dir / STATE_FILE}: {exc}") from None
    stale = MPipelineError(
        f"no supervisor is running {where}: {STATE_FILE} names pid {head.pid}, which is gone "
        "(a killed supervisor leaves it; `mpipeline shm sweep` removes its segments)"
    )
    try:
        control = ControlBlock.attach(head.control)
    except (RingNotFound, RingCorrupted):
        raise stale from None
    except PermissionError:
        raise _other_user(where) from None
    try:
        if control.supervisor_pid != head.pid or not control.supervisor_alive():
            raise stale
        yield Run(run_dir, decode_state(data, run_dir), control)
    finally:
        control.close()


def _other_user(where: str) -> MPipelineError:
    return MPipelineError(f"the pipeline {where} belongs to another user; run this as that user")

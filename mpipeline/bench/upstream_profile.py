"""Where the pipeline's CPU goes on the real job: py-spy on every process during a phase.

``mpipeline bench --upstream --profile DIR`` samples each process of the
pipeline with ``py-spy record --format raw`` while wrk runs, and files every
sample under the innermost frame that belongs to a kind of work below, so the
report can say how much of a shard is still the HTTP client and how much is
the pipeline's own hops. Samples of a thread waiting in the event loop are
not taken (py-spy leaves idle threads out), so the shares are of busy time;
what runs in uvloop's C code (socket calls, polling) shows as the loop's own.
``--nonblocking``: the processes are never paused, so sampling costs them
nothing but the reads of their memory.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Kinds of work, matched on a frame's file (with a "/" in front, as py-spy prints
# paths relative to sys.path); the innermost frame that matches one decides.
CLIENT = "upstream client"
KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        CLIENT,
        (
            "/workers/_client.py",
            "/workers/_conn.py",
            "/workers/_http.py",
            "/aiohttp/",
            "/httpx/",
            "/httpx_aiohttp/",
            "/httpcore/",
            "/anyio/",
            "/h11/",
            "/yarl/",
            "/multidict/",
        ),
    ),
    ("SSE and reply decoding", ("/workers/",)),
    ("shard call path", ("/stages/calls.py", "/resilience/")),
    ("rings and codec", ("/ring/", "/_doorbell.py", "/codec.py", "/_shm.py")),
    ("runner", ("/runner/",)),
    ("stage code", ("/stages/",)),
    ("HTTP server", ("/gateway/", "/pipeline/", "/uvicorn/", "/starlette/")),
    # Nothing above the loop's own frame: uvloop's C code (socket calls, polling).
    ("event loop (uvloop, syscalls)", ("/asyncio/runners.py", "/asyncio/base_events.py")),
)
REST = "the rest"
RATE = 250


class Sampler:
    """py-spy on named processes for ``seconds``; ``shares`` reads what it found."""

    def __init__(self, pids: dict[str, int], seconds: float, out: Path, tag: str) -> None:
        self.out = out
        self.files = {name: out / f"{tag}-{name}.txt" for name in pids}
        self.seconds = seconds
        self.pids = pids
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        pyspy = str(Path(sys.executable).with_name("py-spy"))
        for name, pid in self.pids.items():
            cmd = [pyspy, "record", "--format", "raw", "--nonblocking", "-r", str(RATE)]
            cmd += ["-d", str(max(1, round(self.seconds))), "-p", str(pid)]
            cmd += ["-o", str(self.files[name])]
            with contextlib.suppress(OSError):
                self.procs.append(
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )

    def shares(self) -> dict[str, dict[str, float]]:
        """Per process, the share (0-1) of its busy samples per kind of work."""
        for proc in self.procs:
            try:
                proc.wait(self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out = {}
        for name, path in self.files.items():
            counts = read_raw(path)
            total = sum(counts.values())
            if total:
                out[name] = {k: n / total for k, n in counts.most_common()}
        return out


def kind(stack: str) -> str:
    """The kind of work of one sample: that of its innermost frame that has one."""
    for frame in reversed(stack.split(";")):
        where = "/" + frame[frame.rfind("(") + 1 : frame.rfind(":")]
        for name, parts in KINDS:
            if any(part in where for part in parts):
                return name
    return REST


def read_raw(path: Path) -> Counter[str]:
    """Samples per kind of work in one py-spy raw file (``stack count`` per line)."""
    counts: Counter[str] = Counter()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return counts
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            counts[kind(stack)] += int(n)
    return counts

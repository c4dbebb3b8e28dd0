"""wrk, the HTTP load generator of ``mpipeline bench --http``: its script and its numbers.

wrk (Debian's ``wrk``, ``scripts/setup.sh`` installs it) drives HTTP/1.1
keep-alive connections from C threads, so the load generator costs the box
far less than the server it measures, which a Python client could not
promise. The Lua script builds POSTs of unique prompts and prints the
result as one JSON line from ``done()``, so the numbers are parsed from JSON
rather than from wrk's human-readable text.
"""

from __future__ import annotations

import resource
import subprocess
from importlib import metadata
from pathlib import Path

import msgspec

from mpipeline.bench.cpu import pin

# Distinct requests each wrk thread cycles through: building each request in
# Lua would cost wrk more than the echo costs the server.
WRK_POOL = 1024
WRK_TIMEOUT_S = 10
WRK_MARKER = "wrk-json "


class WrkStats(msgspec.Struct, frozen=True, kw_only=True):
    """What wrk's ``done()`` hook reports; latencies are microseconds."""

    requests: int
    duration_s: float
    bytes: int
    connect_errors: int
    read_errors: int
    write_errors: int
    status_errors: int  # responses with a status >= 400
    timeouts: int
    mean_us: float
    stdev_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def errors(self) -> int:
        return (
            self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.status_errors
            + self.timeouts
        )


def wrk_script(body: str, *, stream: bool, max_tokens: int | None = None) -> str:
    """A wrk Lua script for ``POST /v1/prompt`` with unique prompts (see ``body_script``).

    The JSON is ``{"input": <unique prompt>, "stream"...}``.
    """
    extra = ',"stream":true' if stream else ""
    if max_tokens is not None:
        extra += f',"max_tokens":{max_tokens}'
    return body_script('{"input":"', body, '"' + extra + "}")


def body_script(head: str, body: str, tail: str) -> str:
    """A wrk Lua script: POSTs of ``head + <unique prompt> + tail``; ``done()`` prints JSON.

    Each thread builds ``WRK_POOL`` requests in ``init`` and cycles through them;
    a request's prompt is an 11-byte prefix (thread id, counter) and ``body``.
    ``done()`` prints one line, ``WRK_MARKER`` and a JSON object, so the numbers
    are parsed from JSON (``parse_wrk``) instead of wrk's human-readable text.
    """
    if any("]==]" in part for part in (head, body, tail)):
        raise ValueError("the request parts must need no Lua escaping (no ]==])")
    if '"' in body or "\\" in body:
        raise ValueError("the prompt body must need no JSON or Lua escaping")
    return f"""\
local head = [==[{head}]==]
local body = [==[{body}]==]
local tail = [==[{tail}]==]
local pool = {{}}
local n = 0
local threads = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

function init(args)
  local t = tid or 0
  for k = 1, {WRK_POOL} do
    local input = string.format("%02d%08d %s", t % 100, k, body)
    pool[k] = wrk.format(nil, nil, nil, head .. input .. tail)
  end
end

function request()
  n = n % {WRK_POOL} + 1
  return pool[n]
end

local function num(x)
  if x ~= x or x == math.huge or x == -math.huge then return 0 end
  return x
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\n{WRK_MARKER}{{"requests":%d,"duration_us":%d,"bytes":%d,'
    .. '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"mean":%.1f,"stdev":%.1f,"p50":%d,"p90":%d,"p99":%d,"max":%d}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    num(latency.mean), num(latency.stdev),
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


class _WrkJson(msgspec.Struct, frozen=True):
    requests: int
    duration_us: int
    bytes: int
    connect: int
    read: int
    write: int
    status: int
    timeout: int
    mean: float
    stdev: float
    p50: float
    p90: float
    p99: float
    max: float


def parse_wrk(output: str) -> WrkStats:
    """The numbers of the last ``done()`` line in wrk's stdout.

    :raises ValueError: when there is no such line or it is not the expected JSON
    """
    lines = [ln for ln in output.splitlines() if ln.startswith(WRK_MARKER)]
    if not lines:
        raise ValueError(f"no {WRK_MARKER.strip()!r} line in wrk's output: {output[-500:]!r}")
    try:
        raw = msgspec.json.decode(lines[-1][len(WRK_MARKER) :], type=_WrkJson)
    except msgspec.DecodeError as exc:
        raise ValueError(f"wrk printed a bad result line: {exc}: {lines[-1]!r}") from None
    return WrkStats(
        requests=raw.requests,
        duration_s=raw.duration_us / 1e6,
        bytes=raw.bytes,
        connect_errors=raw.connect,
        read_errors=raw.read,
        write_errors=raw.write,
        status_errors=raw.status,
        timeouts=raw.timeout,
        mean_us=raw.mean,
        stdev_us=raw.stdev,
        p50_us=raw.p50,
        p90_us=raw.p90,
        p99_us=raw.p99,
        max_us=raw.max,
    )


def wrk_command(
    url: str, script: Path, *, threads: int, connections: int, duration_s: int
) -> list[str]:
    return [
        "wrk",
        f"-t{threads}",
        f"-c{max(connections, threads)}",
        f"-d{duration_s}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "-s",
        str(script),
        url,
    ]


def run_wrk(cmd: list[str], cpus: list[int]) -> tuple[WrkStats, float]:
    """Run wrk pinned to ``cpus``; its stats and the CPU seconds it used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    restore = pin(cpus)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        restore()
    out, err = proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {err.strip() or out.strip()}")
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return parse_wrk(out), used


def wrk_version() -> str:
    try:
        proc = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    text = (proc.stdout + proc.stderr).strip().splitlines()
    return text[0].split(" [")[0] if text else "unknown"


def package_version(dist: str) -> str:
    """An installed distribution's version, for a run's record of what it measured."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"

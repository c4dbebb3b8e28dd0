#!/usr/bin/env bash
# Profile every replica under load: start the pipeline, drive requests into it,
# record one py-spy flamegraph per replica (all at once) into profiles/<stamp>/,
# then stop the pipeline with SIGTERM and clean up.
#
#   scripts/profile.sh [-c CONFIG] [-d SECONDS] [-r HZ] [-w WINDOW] [-o DIR] [-i]
#     -c  pipeline config (default config/pipeline.toml, or $MPIPELINE_CONFIG)
#     -d  seconds each replica is sampled (default 10)
#     -r  samples per second (default 100)
#     -w  requests kept in flight by the load driver (default 256)
#     -o  folder the stamped profile folder goes into (default profiles)
#     -i  include idle (waiting) stacks, not only on-CPU ones
#
# py-spy must be allowed to attach (ptrace): see "Profiling" in README.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

config=${MPIPELINE_CONFIG:-config/pipeline.toml}
duration=10
rate=100
window=256
root=profiles
idle=()
while getopts "c:d:r:w:o:ih" opt; do
    case $opt in
        c) config=$OPTARG ;;
        d) duration=$OPTARG ;;
        r) rate=$OPTARG ;;
        w) window=$OPTARG ;;
        o) root=$OPTARG ;;
        i) idle=(--idle) ;;
        h) sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) exit 2 ;;
    esac
done

if [[ -x scripts/setup.sh ]]; then
    scripts/setup.sh
fi

MPL=.venv/bin/mpipeline
PY=.venv/bin/python
out="$root/$(date +%Y%m%d-%H%M%S)"
work=$(mktemp -d "${TMPDIR:-/tmp}/mpipeline-profile.XXXXXX")
run_dir="$work/run"
sup_pid=""
load_pid=""
spy_pids=()

# stop_supervisor [fast]: SIGTERM drains in-flight work first (up to drain_timeout_s);
# "fast" (an aborted run) sends the second SIGTERM that skips the drain.
stop_supervisor() {
    [[ -n "$sup_pid" ]] || return 0
    kill -TERM "$sup_pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 400; i++)); do
        kill -0 "$sup_pid" 2>/dev/null || break
        if [[ "${1:-}" == fast ]] && ((i == 10)); then
            kill -TERM "$sup_pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
    if kill -0 "$sup_pid" 2>/dev/null; then
        echo "profile: the supervisor did not stop in 40 s; killing it" >&2
        kill -KILL "$sup_pid" 2>/dev/null || true
    fi
    wait "$sup_pid" 2>/dev/null || true
    sup_pid=""
}

# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local pid
    # A profiler that dies makes its py-spy stop and write what it has (PDEATHSIG).
    for pid in "${spy_pids[@]}" $load_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${spy_pids[@]}" $load_pid; do
        wait "$pid" 2>/dev/null || true
    done
    stop_supervisor fast
    if ((rc != 0)) && [[ -s "$work/supervisor.log" ]]; then
        echo "profile: supervisor log (last lines):" >&2
        tail -n 20 "$work/supervisor.log" >&2
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "profile: starting the pipeline ($config)" >&2
"$MPL" run --config "$config" --run-dir "$run_dir" >"$work/supervisor.log" 2>&1 &
sup_pid=$!
for ((i = 0; i < 600; i++)); do
    if "$MPL" status --run-dir "$run_dir" >/dev/null 2>&1; then
        break
    fi
    if ! kill -0 "$sup_pid" 2>/dev/null; then
        echo "profile: the supervisor exited during start-up" >&2
        exit 1
    fi
    sleep 0.1
done
"$MPL" status --run-dir "$run_dir" >/dev/null
mapfile -t replicas < <("$MPL" status --run-dir "$run_dir" --json |
    "$PY" -c 'import json, sys; print("\n".join(r["name"] for r in json.load(sys.stdin)["replicas"]))')
if ((${#replicas[@]} == 0)); then
    echo "profile: could not list the replicas" >&2
    exit 1
fi

# Load: a client attached to this supervisor keeps `window` requests in flight
# from before the first sample until after the last.
cat >"$work/load.py" <<'PY'
import asyncio
import sys
import time

from mpipeline.errors import RequestFailed
from mpipeline.pipeline import Pipeline


async def main(run_dir: str, seconds: float, window: int) -> None:
    counts = {"completed": 0, "failed": 0}
    deadline = time.monotonic() + seconds

    async def client(p: Pipeline, i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            try:
                await p.submit(f"profiling request {i}.{n}: summarise this", session_id=f"s{i}")
                counts["completed"] += 1
            except RequestFailed:
                counts["failed"] += 1
            n += 1

    async with Pipeline.attach(run_dir) as p:
        await asyncio.gather(*(client(p, i) for i in range(window)))
    print(f"profile: load done: {counts['completed']} completed, {counts['failed']} failed",
          file=sys.stderr)


asyncio.run(main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3])))
PY
"$PY" "$work/load.py" "$run_dir" "$((duration + 3))" "$window" &
load_pid=$!
sleep 1  # let the load reach a steady state before sampling

mkdir -p "$out"
echo "profile: sampling ${#replicas[@]} replicas for ${duration}s at ${rate} Hz into $out" >&2
for replica in "${replicas[@]}"; do
    "$MPL" profile "$replica" --run-dir "$run_dir" --duration "$duration" --rate "$rate" \
        --output "$out/$replica.svg" "${idle[@]}" >"$out/$replica.log" 2>&1 &
    spy_pids+=($!)
done
failed=0
for i in "${!spy_pids[@]}"; do
    if ! wait "${spy_pids[$i]}"; then
        failed=1
        echo "profile: ${replicas[$i]} failed:" >&2
        sed 's/^/  /' "$out/${replicas[$i]}.log" >&2
    fi
done
spy_pids=()
"$MPL" status --run-dir "$run_dir" >"$out/status.txt" || true
wait "$load_pid" || echo "profile: the load driver failed" >&2
load_pid=""
stop_supervisor

for svg in "$out"/*.svg; do
    [[ -e "$svg" ]] && echo "profile: wrote $svg" >&2
done
exit "$failed"

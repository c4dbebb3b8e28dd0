#!/usr/bin/env bash
# Everything CI checks: lint and types, the whole test suite, a smoke run of the benchmarks.
# Arguments go to the test-suite pytest (e.g. scripts/test.sh -x -k ring).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
scripts/check
.venv/bin/pytest "$@"
.venv/bin/pytest bench/micro --benchmark-disable -q

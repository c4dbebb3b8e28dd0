#!/usr/bin/env bash
# Run the pipeline in the foreground with the default (or $MPIPELINE_CONFIG) config.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec .venv/bin/mpipeline run --config "${MPIPELINE_CONFIG:-config/pipeline.toml}" "$@"

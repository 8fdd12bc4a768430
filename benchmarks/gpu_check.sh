#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md), capped at 8 minutes in all:
#   benchmarks/gpu_check.sh runs/gpu-check                # on the GPU machine
#   benchmarks/gpu_check.sh runs/gpu-dry --cpu-dry-run    # the rehearsal on a CPU
# Each step has its own budget inside (benchmarks/gpu_check.py); the report is rewritten after every
# step, so a check stopped by the cap still leaves the steps it finished in OUTPUT_DIR/report.json.
set -uo pipefail
cd "$(dirname "$0")/.."
exec timeout --kill-after=10 480 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"

#!/usr/bin/env bash
# The device check: one command on a GPU machine, nothing downloaded. A shortened
# `crossdiff run --preset paper` (200 LM steps on the embedded corpus, a 1M-token bfloat16 store,
# 500 crosscoder steps) measured stage by stage, and crossdiff's MoE layer against
# TransformerLens's stock one at the paper's shapes; one JSON file (benchmarks/out/gpu_check.json).
#
#   bash benchmarks/gpu_check.sh                  # on the GPU (under 8 minutes on one H200)
#   bash benchmarks/gpu_check.sh --micro          # the micro preset on the CPU (seconds to minutes)
#   CROSSDIFF_GPU_CHECK_MICRO=1 bash benchmarks/gpu_check.sh    # the same as --micro
#
# Other flags go to benchmarks/gpu_check.py (--lm-steps, --harvest-tokens, --crosscoder-steps,
# --json PATH, --work DIR to keep the run folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
args=("$@")
if [ "${CROSSDIFF_GPU_CHECK_MICRO:-0}" = "1" ]; then args+=(--micro); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_check.py "${args[@]}"

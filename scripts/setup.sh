#!/usr/bin/env bash
# Creates .venv and installs crossdiff with the pinned set-up (CPU torch from constraints.txt).
# Usage: bash scripts/setup.sh [extra]     e.g. `bash scripts/setup.sh test`
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
target="."
if [ -n "$extra" ]; then target=".[$extra]"; fi
.venv/bin/python -m pip install -q -c constraints.txt -e "$target"

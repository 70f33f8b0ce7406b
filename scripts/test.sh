#!/usr/bin/env bash
# The README's test command: sets everything up on a fresh machine and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# The HTML report is checked in a real headless browser (Debian's chromium). Install it when we can;
# the browser test skips with a message saying why when no browser can be had.
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "note: could not install chromium; the browser test will be skipped"
    else
        echo "note: chromium is not installed and apt-get is not usable; the browser test will be skipped"
    fi
fi
.venv/bin/python -m ruff check crossdiff tests benchmarks examples
.venv/bin/python -m ruff format --check crossdiff tests benchmarks examples
# two workers (pytest-xdist), each test file on one of them so its module fixtures are built once;
# CROSSDIFF_TEST_WORKERS=0 runs in this process (e.g. for a debugger)
workers="${CROSSDIFF_TEST_WORKERS:-2}"
if [ "$workers" = "0" ]; then
    .venv/bin/python -m pytest "$@"
else
    # one torch/OpenMP thread per test process: workers with a thread per core each oversubscribe
    # the cores, and OpenMP's spin-waiting then makes small tensor work many times slower
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
fi

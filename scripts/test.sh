#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite (CPU, offline), one pytest-xdist worker per core.
#   bash scripts/test.sh            every test (the README's test command; CI runs it)
#   bash scripts/test.sh --quick    the quick tier: leaves out the tests marked `heavy` (real processes, whole
#                                   pipelines), still importing and exercising every module
# Other arguments go to pytest (-k NAME, -x, ...). TEST_WORKERS=1 runs in one process (default: one per core).
# Every test has a time limit (pyproject.toml: timeout), and the 20 slowest are listed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests scripts benchmarks examples
.venv/bin/ruff format --check src tests scripts benchmarks examples
export HF_HUB_OFFLINE=1
args=()
for arg in "$@"; do
    if [ "$arg" = --quick ]; then args+=(-m "not heavy"); else args+=("$arg"); fi
done
workers=${TEST_WORKERS:-$(nproc)}
parallel=()
# one test file per worker at a time, most expensive first (tests/conftest.py orders them; xdist keeps that order)
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
exec .venv/bin/python -m pytest "${parallel[@]}" --durations=20 "${args[@]}"

#!/usr/bin/env bash
# Set up (if needed), lint, and run the test suite (CPU, offline). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests scripts benchmarks examples
.venv/bin/ruff format --check src tests scripts benchmarks examples
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# Set up (if needed) and run the built-in CPU demo: pretrain a tiny model, SFT vs SPIN, report.
# Extra arguments go to `spin-diffusion demo` (e.g. --out my_demo --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/spin-diffusion demo "$@"

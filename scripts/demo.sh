#!/usr/bin/env bash
# Set up (if needed) and run the built-in CPU demo: SFT vs SPIN from the shipped tiny base, 3 seeds, report.
# Extra arguments go to `spin-diffusion demo` (e.g. --out my_demo --seeds 1 --pretrain).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/spin-diffusion demo "$@"

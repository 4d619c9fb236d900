#!/usr/bin/env bash
# Create .venv and install spin-diffusion with its test tools. Idempotent: a second run only checks.
# CPU machines get the CPU build of torch (torch==2.13.0); set TORCH_SPEC to choose another, e.g.
#   TORCH_SPEC="torch==2.5.1" bash scripts/setup.sh      (a CUDA machine: any torch >= 2.1 works)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, spin_diffusion" 2>/dev/null; then
    # torch first and pinned: an unpinned torch would resolve to a multi-GB CUDA build.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/python -c "import torch, spin_diffusion; print(f'spin-diffusion {spin_diffusion.__version__}, torch {torch.__version__}')"

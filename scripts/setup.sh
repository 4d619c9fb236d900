#!/usr/bin/env bash
# Create .venv and install spin-diffusion with its test tools from requirements.lock (the exact versions the
# tests pass with). Idempotent: a second run only checks.
# CPU machines get the CPU build of torch (torch==2.13.0); set TORCH_SPEC to choose another, e.g.
#   TORCH_SPEC="torch==2.5.1" bash scripts/setup.sh      (a CUDA machine: any torch >= 2.1 works)
# Installs with uv (itself pip-installed into .venv; about 10x faster here); INSTALLER=pip uses pip alone.
# UNLOCKED=1 installs the newest versions that pyproject.toml allows instead of the lockfile.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
INSTALLER=${INSTALLER:-uv}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
pip() {
    .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true
}
install() {  # the same arguments for pip and uv
    if [ "$INSTALLER" = uv ]; then
        .venv/bin/uv pip install --quiet --python .venv/bin/python "$@"
    else
        pip "$@"
    fi
}
# Installs again when the lockfile, pyproject.toml or TORCH_SPEC changed since the last install (a stamp in .venv).
stamp=.venv/.installed-from
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16) $TORCH_SPEC ${UNLOCKED:+unlocked}"
version() {
    .venv/bin/python -c "import torch, spin_diffusion; print(f'spin-diffusion {spin_diffusion.__version__}, torch {torch.__version__}')"
}
# one import of torch when nothing is to install (a few seconds of every demo and test run)
if ! installed=$(version 2>/dev/null) || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    if [ "$INSTALLER" = uv ]; then
        pip uv
        # uv does not read pip's configuration: pass on its package sources (local mirrors, wheel folders)
        links=$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)
        extra=$(.venv/bin/python -m pip config get global.extra-index-url 2>/dev/null || true)
        [ -n "$links" ] && export UV_FIND_LINKS=${UV_FIND_LINKS:-$links}
        [ -n "$extra" ] && export UV_EXTRA_INDEX_URL=${UV_EXTRA_INDEX_URL:-$extra}
        export UV_INDEX_STRATEGY=${UV_INDEX_STRATEGY:-unsafe-best-match}  # like pip: best match over all indexes
    fi
    # torch pinned, before anything that depends on it: an unpinned torch resolves to a multi-GB CUDA build.
    install "$TORCH_SPEC"
    if [ -n "${UNLOCKED:-}" ]; then
        install -e ".[dev]"
    else
        install -r requirements.lock
        install --no-deps -e .
    fi
    echo "$want" > "$stamp"
    installed=$(version)
fi
echo "$installed"

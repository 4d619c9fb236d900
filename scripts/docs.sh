#!/usr/bin/env bash
# Build the API reference from the docstrings (pdoc) into OUT (default build/api); fails on any pdoc warning.
#   bash scripts/docs.sh [OUT]        then open OUT/index.html
# From a fresh clone this is the one command: it sets up .venv (scripts/setup.sh) and installs the locked pdoc.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
if ! .venv/bin/python -c "import pdoc" 2>/dev/null; then  # a .venv made before pdoc joined the dev tools
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps \
        $(grep -E '^(pdoc|markdown2)==' requirements.lock)
fi
HF_HUB_OFFLINE=1 exec .venv/bin/python scripts/build_docs.py "$@"

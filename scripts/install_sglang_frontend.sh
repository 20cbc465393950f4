#!/usr/bin/env bash
# Installs SGLang's frontend language (sgl.function, sgl.RuntimeEndpoint) into the active
# venv without its GPU server stack: a CPU torch wheel, sglang itself with --no-deps, then
# the light dependencies the frontend imports. About 2 minutes the first time; a no-op
# when `import sglang.lang` already works. Used by the SGLang compatibility tests.
# Usage: bash scripts/install_sglang_frontend.sh   (inside the venv, e.g. after setup_venv.sh)
set -euo pipefail
py="${PYTHON:-python}"
if "$py" -c "import sglang, sglang.lang; from sglang import RuntimeEndpoint" >/dev/null 2>&1; then
  exit 0
fi
echo "[setup] installing SGLang's frontend (CPU route; ~2 min)"
# Pinned: an unpinned torch pulls a multi-GB CUDA build.
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q --no-deps sglang
"$py" -m pip install -q numpy orjson psutil pybase64 requests triton packaging pillow \
  starlette msgspec pydantic pyzmq tqdm IPython aiohttp
"$py" -c "import sglang, sglang.lang; from sglang import RuntimeEndpoint" \
  || { echo "[setup] SGLang frontend import failed" >&2; exit 1; }

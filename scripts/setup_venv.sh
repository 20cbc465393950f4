#!/usr/bin/env bash
# Creates (or reuses) the project venv and installs progserve with the given extras.
# Usage: source scripts/setup_venv.sh EXTRAS   (e.g. "dev,redis")
# Honours PROGSERVE_VENV (default: .venv in the repo root).
set -euo pipefail
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_venv="${PROGSERVE_VENV:-$_root/.venv}"
_py="${PYTHON:-python3}"
if [ ! -x "$_venv/bin/python" ]; then
  echo "[setup] creating venv $_venv"
  "$_py" -m venv "$_venv"
fi
# shellcheck disable=SC1091
. "$_venv/bin/activate"
_extras="${1:-}"
_stamp="$_venv/.progserve-installed-${_extras//,/_}"
if [ ! -f "$_stamp" ] || [ "$_root/pyproject.toml" -nt "$_stamp" ]; then
  echo "[setup] installing progserve[${_extras}]"
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  python -m pip install -q -e "$_root[${_extras}]"
  touch "$_stamp"
fi

#!/usr/bin/env bash
# Makes the browser test runnable on a fresh machine: Debian's chromium (driven through
# Playwright's Python package with executable_path=/usr/bin/chromium) and the playwright
# wheel. Never runs `playwright install`: the browser comes from apt, not from a CDN.
# Usage: bash scripts/install_browser.sh   (idempotent; a no-op when both are present)
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
     (apt-get update -q >/dev/null 2>&1 && \
      apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) || true
  fi
  command -v chromium >/dev/null 2>&1 || \
    echo "[setup] chromium is not installed; the browser test will be skipped" >&2
fi
if ! python -c "import playwright" >/dev/null 2>&1; then
  python -m pip install -q "playwright>=1.40" || \
    echo "[setup] could not install playwright; the browser test will be skipped" >&2
fi

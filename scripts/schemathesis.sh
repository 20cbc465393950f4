#!/usr/bin/env bash
# Schemathesis against progserve's own OpenAPI schema, every endpoint, every check
# (`--checks all`): property-based, boundary and negative inputs, undeclared methods;
# answers checked for 5xx, for documented shapes, and for accepting exactly what the
# schema says. Starts `progserve serve --engine sim` (fast timings) on a free loopback
# port, runs schemathesis, stops the server, then `scripts/schemathesis_verdict.py`
# reads the report: the only failures allowed are the by-design ones (a 400 for a rule
# relating two fields, which JSON Schema cannot state; listed in docs/reliability.md).
# Exit status: 0 when nothing else was found.
# Usage: bash scripts/schemathesis.sh [MAX_EXAMPLES] [extra schemathesis args...]
#   MAX_EXAMPLES defaults to 100 per operation and phase (docs/reliability.md has the result).
#   PROGSERVE_* variables in the environment reach the server (the test raises the
#   in-flight budget with one). One worker: Hypothesis 6.170's lambda-source cache is not
#   thread-safe (two workers ended a run with a KeyError inside Hypothesis).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  # shellcheck disable=SC1091
  source scripts/setup_venv.sh "dev,redis"
fi
python -c "import schemathesis" 2>/dev/null || python -m pip install -q "schemathesis>=4.0"
max_examples="${1:-100}"
shift || true
port="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log="$(mktemp)"
# A fast sim (generations of thousands of tokens finish in milliseconds) and small limits,
# so that fuzzed requests test validation rather than wait on generation.
PROGSERVE_SIM__TIME_SCALE=0.0001 PROGSERVE_LIMITS__MAX_TOKENS=4096 \
  progserve serve --engine sim --host 127.0.0.1 --port "$port" --log-level warning \
  >"$log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 200); do
  curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 0.1
done
work="$(mktemp -d)"  # schemathesis keeps its example database in the current directory
set +e
(cd "$work" && schemathesis run "http://127.0.0.1:$port/openapi.json" \
  --checks all --max-response-time 30 \
  --phases examples,coverage,fuzzing \
  --max-examples "$max_examples" --seed 1 --workers 1 --request-timeout 30 \
  --suppress-health-check all --report junit --report-junit-path "$work/junit.xml" "$@")
python scripts/schemathesis_verdict.py "$work/junit.xml"
rc=$?
rm -rf "$work"
set -e
if grep -q "Traceback" "$log"; then
  echo "[schemathesis.sh] the server logged a traceback:" >&2
  cat "$log" >&2
  rc=1
fi
exit "$rc"

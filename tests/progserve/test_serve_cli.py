"""`progserve serve`: flags, their precedence over env and file, startup errors, and a
real server process."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from progserve.cli import build_parser
from progserve.commands.serve import settings_from_args


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "progserve.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--engine", "--engine-url", "--model", "--policy", "--redis-url", "--host",
                 "--port", "--api-keys", "--config"):
        assert flag in out


def test_flags_beat_env_beat_file(tmp_path, monkeypatch):
    config = tmp_path / "progserve.toml"
    config.write_text('port = 4000\nmodel = "from-file"\nlog_level = "error"\n'
                      '[scheduler]\npolicy = "fcfs"\n[limits]\nmax_tokens = 99\n')
    monkeypatch.setenv("PROGSERVE_MODEL", "from-env")
    monkeypatch.setenv("PROGSERVE_PORT", "5000")
    settings = settings_from_args(parse("--config", str(config), "--port", "6000",
                                        "--policy", "plas"))
    assert settings.port == 6000  # flag over env and file
    assert settings.scheduler.policy == "plas"  # flag over file
    assert settings.model == "from-env"  # env over file
    assert settings.limits.max_tokens == 99  # file over default
    assert settings.log_level == "error"  # file, nothing overrides it
    monkeypatch.setenv("PROGSERVE_SCHEDULER__POLICY", "mlfq")
    nested = settings_from_args(parse("--config", str(config)))
    assert nested.scheduler.policy == "mlfq"  # a nested env var over the file's section
    assert nested.port == 5000


def test_engine_urls_repeat_one_per_replica():
    settings = settings_from_args(parse("--engine", "sglang", "--engine-url", "http://a:1",
                                        "--engine-url", "http://b:2"))
    assert settings.engine == "sglang"
    assert settings.engine_url == ["http://a:1", "http://b:2"]


def test_sglang_replicas_share_one_priority_file_writer(tmp_path):
    from progserve.engines import build_engines

    path = tmp_path / "priorities.json"
    settings = settings_from_args(parse("--engine", "sglang", "--engine-url", "http://a:1",
                                        "--engine-url", "http://b:2",
                                        "--sglang-priority-file", str(path)))
    assert settings.http_engine.sglang_priority_file == path
    engines = build_engines(settings)
    assert json.loads(path.read_text()) == {"pinned": [], "priorities": {}, "ended": []}
    assert all(e.capabilities().retention for e in engines)
    assert engines[0]._writer is engines[1]._writer  # one file, one writer
    plain = build_engines(settings_from_args(parse("--engine", "sglang", "--engine-url",
                                                   "http://a:1")))
    assert not plain[0].capabilities().retention


@pytest.mark.parametrize("argv,message", [
    (["--engine", "sglang"], "--engine-url"),
    (["--engine", "openai"], "--engine-url"),
    (["--engine", "torch", "--model", "/no/such/dir"], "not a directory"),
    (["--api-keys", "/no/such/keys.json"], "API keys"),
    (["--engine", "sglang", "--engine-url", "http://127.0.0.1:9",
      "--sglang-priority-file", "/no/such/dir/p.json"], "priority file"),
])
def test_startup_errors_are_clear(argv, message):
    proc = subprocess.run([sys.executable, "-m", "progserve.cli", "serve", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_process_end_to_end(serve_process, tmp_path):
    keys = tmp_path / "keys.json"
    from progserve.auth import hash_key

    keys.write_text(json.dumps({hash_key("sk-test"): "team"}))
    server = serve_process("--engine", "sim", "--policy", "plas", "--api-keys", str(keys),
                           env={"PROGSERVE_SIM__TIME_SCALE": "0.02"})
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["engine"] == "sim"
    info = httpx.get(server.url + "/get_server_info",
                     headers={"Authorization": "Bearer sk-test"}).json()
    assert info["policy"] == "plas"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test", max_retries=0)
    reply = client.chat.completions.create(model="m", max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"ignore_eos": True})  # 3 exactly
    assert reply.usage.completion_tokens == 3

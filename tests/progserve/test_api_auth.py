"""API keys -> tenants, and tenant isolation: a tenant can neither see, wait on, stream,
grow, end, cancel nor abort another tenant's programs and requests."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import openai
import pytest

from progserve.app import create_app
from progserve.auth import Authenticator, KeyFileError, hash_key
from progserve.config import Settings
from progserve.runtime import ServerRuntime

KEYS = {"key-acme": "acme", "key-globex": "globex"}


@pytest.fixture(scope="module")
def server(serve_in_thread, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("auth") / "keys.json"
    keys_file.write_text(json.dumps({hash_key(k): t for k, t in KEYS.items()}))
    settings = Settings(api_keys=keys_file, sim={"time_scale": 0.05})
    return serve_in_thread(create_app(ServerRuntime(settings)))


def as_tenant(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_required(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0) \
            .chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    no_key = httpx.post(server.url + "/generate", json={"text": "x"})
    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(server.url + "/v1/programs").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_valid_keys_work_with_either_header(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="key-acme", max_retries=0)
    assert client.chat.completions.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}]).choices
    resp = httpx.post(server.url + "/generate", headers={"X-API-Key": "key-globex"},
                      json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
    assert resp.status_code == 200


def test_tenants_cannot_touch_each_others_programs(server):
    acme, globex = as_tenant("key-acme"), as_tenant("key-globex")
    spec = {"program_id": "acme-secret", "inputs": {"q": "secret"}, "calls": [
        {"id": "a", "prompt": "{{q}}", "output": "answer", "sampling": {"max_new_tokens": 2}}]}
    assert httpx.post(server.url + "/v1/programs", json=spec, headers=acme).status_code == 201
    base = server.url + "/v1/programs/acme-secret"
    for method, path, body in [
        ("GET", "", None),
        ("GET", "/variables/answer", None),
        ("GET", "/variables/answer?stream=true", None),
        ("POST", "/calls", {"calls": [{"id": "b", "prompt": "x"}]}),
        ("POST", "/end", None),
        ("DELETE", "", None),
    ]:
        resp = httpx.request(method, base + path, json=body, headers=globex)
        assert resp.status_code == 404, (method, path, resp.text)
        assert "secret" not in resp.json()["detail"].replace("acme-secret", "")
    listed = httpx.get(server.url + "/v1/programs", headers=globex).json()["data"]
    assert "acme-secret" not in {p["id"] for p in listed}
    # The owner still sees it, untouched.
    value = httpx.get(base + "/variables/answer", headers=acme, timeout=30).json()["value"]
    assert value is not None
    assert httpx.get(base, headers=acme).json()["tenant"] == "acme"


def test_same_program_id_in_two_tenants_are_two_programs(server):
    for key in ("key-acme", "key-globex"):
        httpx.post(server.url + "/v1/chat/completions", headers={
            **as_tenant(key), "X-Program-Id": "agent"},
            json={"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": key}]})
    acme_state = httpx.get(server.url + "/v1/programs/agent", headers=as_tenant("key-acme"))
    assert acme_state.json()["tenant"] == "acme" and len(acme_state.json()["calls"]) == 1


def test_a_tenant_cannot_abort_another_tenants_request(server):
    result: dict[str, object] = {}
    started = threading.Event()

    def long_call() -> None:
        with httpx.stream("POST", server.url + "/generate", headers=as_tenant("key-acme"),
                          timeout=60, json={"text": "go", "rid": "acme-rid", "stream": True,
                                            "sampling_params": {"max_new_tokens": 300,
                                                                "ignore_eos": True}}) as resp:
            events = []
            for line in resp.iter_lines():
                started.set()
                if line.startswith("data:") and line != "data: [DONE]":
                    events.append(json.loads(line[5:]))
            result["last"] = events[-1]

    thread = threading.Thread(target=long_call)
    thread.start()
    assert started.wait(10)
    denied = httpx.post(server.url + "/abort_request", headers=as_tenant("key-globex"),
                        json={"rid": "acme-rid"})
    assert denied.json()["aborted"] == 0
    denied_all = httpx.post(server.url + "/abort_request", headers=as_tenant("key-globex"),
                            json={"abort_all": True})
    assert denied_all.json()["aborted"] == 0
    thread.join(60)
    assert result["last"]["meta_info"]["finish_reason"]["type"] == "length"  # type: ignore[index]


def test_keys_file_must_hold_digests(tmp_path: Path):
    raw = tmp_path / "raw.json"
    raw.write_text(json.dumps({"my-plain-key": "acme"}))
    with pytest.raises(KeyFileError, match="sha256"):
        Authenticator.from_file(raw)
    bad_tenant = tmp_path / "tenant.json"
    bad_tenant.write_text(json.dumps({hash_key("k"): "no spaces allowed"}))
    with pytest.raises(KeyFileError):
        Authenticator.from_file(bad_tenant)
    assert Authenticator.from_file(None).tenant_for({}) == "default"


def test_a_generation_request_is_authenticated_once(server, monkeypatch):
    """The admission middleware's lookup is the route's too (a key hashed once per call)."""
    import progserve.auth as auth

    hashed: list[str] = []
    real = auth.hash_key
    monkeypatch.setattr(auth, "hash_key", lambda key: hashed.append(key) or real(key))
    for path, body in [("/v1/chat/completions", {"model": "m", "max_tokens": 1, "messages": [
            {"role": "user", "content": "x"}]}),
            ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 1}})]:
        hashed.clear()
        resp = httpx.post(server.url + path, json=body, headers=as_tenant("key-acme"))
        assert resp.status_code == 200, resp.text
        assert hashed == ["key-acme"]

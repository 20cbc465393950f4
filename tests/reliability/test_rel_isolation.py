"""Tenant isolation, end to end over HTTP with hashed API keys: a tenant cannot read,
wait on, stream, grow, end or cancel another tenant's programs, nor see its variables,
traces (/ui) or tenant-labelled metric series (/metrics), even when both use the same
program id. An admin tenant sees everyone; a missing or wrong key sees nothing."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from rel_support import wait_until

from progserve.app import create_app
from progserve.auth import hash_key
from progserve.config import Settings
from progserve.runtime import ServerRuntime

KEYS = {"k-acme-7f3a": "acme", "k-globex-91c2": "globex", "k-root-55aa": "admin"}
ACME, GLOBEX, ADMIN = ({"Authorization": f"Bearer {k}"} for k in KEYS)


@pytest.fixture(scope="module")
def server(serve_in_thread, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({hash_key(k): t for k, t in KEYS.items()}))
    runtime = ServerRuntime(Settings(api_keys=keys_file, sim={"time_scale": 0.2}))
    srv = serve_in_thread(create_app(runtime))
    srv.keys_file = keys_file
    # Both tenants run a program under the SAME id, plus acme one of its own.
    for headers, who in ((ACME, "acme"), (GLOBEX, "globex")):
        spec = {"program_id": "shared", "inputs": {"q": f"{who}-question"}, "calls": [
            {"id": f"{who}_call", "prompt": "Answer {{q}}", "output": "answer",
             "sampling": {"max_new_tokens": 4}}]}
        assert httpx.post(srv.url + "/v1/programs", json=spec, headers=headers).status_code == 201
    long_spec = {"program_id": "acme-only", "inputs": {"q": "acme-private"}, "calls": [
        {"id": "slow", "prompt": "Think long about {{q}}", "output": "thought",
         "sampling": {"max_new_tokens": 400, "ignore_eos": True}}]}
    assert httpx.post(srv.url + "/v1/programs", json=long_spec, headers=ACME).status_code == 201
    for headers in (ACME, GLOBEX):
        r = httpx.get(srv.url + "/v1/programs/shared/variables/answer",
                      params={"timeout": 30}, headers=headers, timeout=40)
        assert r.status_code == 200
    return srv


def test_keys_are_hashed_at_rest_and_required(server):
    stored = server.keys_file.read_text()
    assert not any(key in stored for key in KEYS)  # digests only
    assert all(hash_key(key) in stored for key in KEYS)
    wrong = ({}, {"Authorization": "Bearer nope"}, {"X-API-Key": "k-acme-7f3"},
             {"Authorization": f"Bearer {hash_key('k-acme-7f3a')}"})  # the digest is no key
    for headers in wrong:
        for method, path in (("GET", "/v1/programs"), ("GET", "/v1/programs/shared"),
                             ("GET", "/ui/api/programs"), ("GET", "/metrics"),
                             ("POST", "/generate"), ("POST", "/abort_request")):
            resp = httpx.request(method, server.url + path, headers=headers, json={})
            assert resp.status_code == 401, (headers, path, resp.status_code)


FORBIDDEN = [
    ("GET", "", None),
    ("GET", "/variables/thought", None),
    ("GET", "/variables/thought?timeout=1", None),
    ("GET", "/variables/thought?stream=true", None),
    ("POST", "/calls", {"calls": [{"id": "x", "prompt": "leak {{q}}", "output": "leak"}]}),
    ("POST", "/end", None),
    ("DELETE", "", None),
]


@pytest.mark.parametrize("method, suffix, body", FORBIDDEN)
def test_other_tenants_programs_are_invisible(server, method, suffix, body):
    resp = httpx.request(method, f"{server.url}/v1/programs/acme-only{suffix}", json=body,
                         headers=GLOBEX, timeout=10)
    assert resp.status_code == 404, resp.text  # as if it did not exist: no existence leak
    assert "acme-private" not in resp.text


def test_the_owner_is_unaffected_and_lists_are_per_tenant(server):
    state = httpx.get(server.url + "/v1/programs/acme-only", headers=ACME).json()
    assert state["tenant"] == "acme" and state["status"] != "cancelled"
    acme_ids = {p["id"] for p in httpx.get(server.url + "/v1/programs", headers=ACME)
                .json()["data"]}
    globex = httpx.get(server.url + "/v1/programs", headers=GLOBEX).json()["data"]
    assert acme_ids >= {"shared", "acme-only"}
    assert {p["id"] for p in globex} == {"shared"} and globex[0]["tenant"] == "globex"


def test_same_program_id_two_tenants_two_programs(server):
    mine = httpx.get(server.url + "/v1/programs/shared", headers=GLOBEX).json()
    assert [c["id"] for c in mine["calls"]] == ["globex_call"]
    assert mine["variables"]["q"] == "globex-question"


def test_traces_are_per_tenant(server):
    def ui(path: str, headers: dict, **params) -> httpx.Response:
        return httpx.get(server.url + "/ui/api/programs" + path, headers=headers,
                         params=params, timeout=10)

    wait_until(lambda: ui("/shared", GLOBEX).status_code == 200, 10)
    listed = ui("", GLOBEX).json()["programs"]
    assert {p["tenant"] for p in listed} == {"globex"}
    trace = ui("/shared", GLOBEX).json()
    text = json.dumps(trace)
    assert "acme_call" not in text and "acme" not in {s.get("tenant") for s in trace["spans"]}
    assert "globex_call" in text
    assert ui("/acme-only", GLOBEX).status_code == 404
    assert ui("/shared", GLOBEX, tenant="acme").status_code == 404
    # The admin sees both tenants, each under its own key.
    assert {p["tenant"] for p in ui("", ADMIN).json()["programs"]} >= {"acme", "globex"}
    assert "acme_call" in json.dumps(ui("/shared", ADMIN, tenant="acme").json())


def test_metrics_labels_are_per_tenant(server):
    def tenants_in(headers: dict) -> set[str]:
        text = httpx.get(server.url + "/metrics", headers=headers).text
        return set(re.findall(r'tenant="([^"]+)"', text))

    wait_until(lambda: tenants_in(ADMIN) >= {"acme", "globex"}, 10)
    assert tenants_in(GLOBEX) == {"globex"}
    assert tenants_in(ACME) == {"acme"}


def test_a_tenant_cannot_abort_another_tenants_rid(server):
    thread_result: dict = {}

    def run() -> None:
        thread_result["resp"] = httpx.post(
            server.url + "/generate", headers=ACME, timeout=60,
            json={"text": "go on", "rid": "acme-long-rid",
                  "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}})

    import threading

    thread = threading.Thread(target=run)
    thread.start()
    requests = server.app.state.runtime.requests
    wait_until(lambda: requests.in_flight("acme", "acme-long-rid"), 10)
    for body in ({"rid": "acme-long-rid"}, {"abort_all": True}):
        assert httpx.post(server.url + "/abort_request", headers=GLOBEX,
                          json=body).json()["aborted"] == 0
    thread.join(60)
    meta = thread_result["resp"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "length" and meta["completion_tokens"] == 200

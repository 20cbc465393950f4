"""Issue 18.6: operator routes are for operators. Before the fix any tenant could flush
every tenant's prefix cache with a GET or POST `/flush_cache` while the others ran, and
read the server's load. Now the keys file gives keys a role (the old format still reads:
a plain tenant name is a user), `/flush_cache` takes an admin key and a POST (a GET is a
405 with `Allow`), and the server's load (`/get_server_info`, `/metrics`) is for admins."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from progserve.app import create_app
from progserve.auth import Authenticator, KeyFileError, hash_key
from progserve.config import Settings
from progserve.runtime import ServerRuntime

ENTRIES = {
    "k-alice-3b1f": "alice",  # the format before roles: a user
    "k-bob-77c0": {"tenant": "bob"},
    "k-ops-e51d": {"tenant": "ops", "role": "admin"},
    "k-legacy-admin-9a0c": "admin",  # a tenant in observability.admin_tenants
}
ALICE, BOB, OPS, LEGACY = ({"Authorization": f"Bearer {k}"} for k in ENTRIES)
PROMPT = "A long shared context that took a while to prefill. " * 30


@pytest.fixture(scope="module")
def server(serve_in_thread, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    keys_file.write_text(json.dumps({hash_key(k): v for k, v in ENTRIES.items()}))
    return serve_in_thread(create_app(ServerRuntime(Settings(api_keys=keys_file,
                                                       sim={"time_scale": 0.01}))))


def generate(server, headers: dict) -> dict:
    resp = httpx.post(server.url + "/generate", headers=headers, timeout=30,
                      json={"text": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    assert resp.status_code == 200, resp.text
    return resp.json()["meta_info"]


def test_a_tenant_cannot_flush_the_cache(server):
    generate(server, ALICE)
    assert generate(server, ALICE)["cached_tokens"] > 100
    for method in ("GET", "POST"):
        resp = httpx.request(method, server.url + "/flush_cache", headers=BOB)
        assert resp.status_code in (403, 405), (method, resp.status_code, resp.text)
    denied = httpx.post(server.url + "/flush_cache", headers=BOB).json()["error"]
    assert denied["type"] == "permission_error" and denied["code"] == "admin_only"
    assert generate(server, ALICE)["cached_tokens"] > 100  # Alice's cache is still there


def test_flush_is_post_only_and_admin_only(server):
    for admin in (OPS, LEGACY):
        got = httpx.get(server.url + "/flush_cache", headers=admin)
        assert got.status_code == 405 and got.headers["allow"] == "POST"
        assert httpx.post(server.url + "/flush_cache", headers=admin).status_code == 200
    assert generate(server, ALICE)["cached_tokens"] == 0  # an admin's flush did flush
    assert httpx.post(server.url + "/flush_cache").status_code == 401


def test_the_servers_load_is_for_admins(server):
    generate(server, BOB)
    bob = httpx.get(server.url + "/get_server_info", headers=BOB).json()["internal_states"]
    assert bob == [{"tenant": "bob", "requests_in_progress": 0, "open_llm_calls": 0}]
    ops = httpx.get(server.url + "/server_info", headers=OPS).json()["internal_states"][0]
    assert {"queued", "running", "programs_open", "open_llm_calls"} <= set(ops)

    def series(headers: dict) -> set[tuple[str, str | None]]:
        text = httpx.get(server.url + "/metrics", headers=headers).text
        return {(s.name, s.labels.get("tenant")) for f in text_string_to_metric_families(text)
                for s in f.samples}

    assert {tenant for _, tenant in series(BOB)} == {"bob"}  # no unlabelled load series
    admin_view = {name for name, _ in series(OPS)}
    assert {"progserve_queued_calls", "progserve_running_calls"} <= admin_view


def test_the_keys_file_checks_roles(tmp_path):
    for entry in ({"tenant": "x", "role": "root"}, {"tenant": "x", "rights": "all"},
                  {"role": "admin"}):
        path = tmp_path / "keys.json"
        path.write_text(json.dumps({hash_key("k"): entry}))
        with pytest.raises(KeyFileError):
            Authenticator.from_file(path)
    path.write_text(json.dumps({hash_key("k"): {"tenant": "x", "role": "admin"},
                                hash_key("j"): "y"}))
    auth = Authenticator.from_file(path)
    assert auth.caller_for({"x-api-key": "k"}).admin
    assert not auth.caller_for({"x-api-key": "j"}).admin
    assert Authenticator.from_file(None).caller_for({}).admin  # no keys: one owner

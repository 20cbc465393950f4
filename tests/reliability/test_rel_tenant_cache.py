"""Issue 18.4: the shared prefix cache must not be a side channel between tenants.

Alice sends a long confidential prompt; Bob sends the same text. Before the fix Bob's
answer reported `cached_tokens` = all but one of its prompt tokens (and was faster): Bob
learned that someone had sent exactly that text. By default a cache hit never crosses
tenants, on the sim and the torch engine alike, through the real server and the official
`openai` client; `cache.share_across_tenants = true` restores sharing for single-owner
deployments. (The HTTP engines' salt is tested against a recording upstream in
tests/engine_backend.)
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_backend.radix_cache import RadixCache
from engine_backend.sim.engine import SimEngine
from engine_backend.types import GenerateRequest
from progserve.app import create_app
from progserve.auth import hash_key
from progserve.config import Settings
from progserve.runtime import ServerRuntime
from scheduler.cache_salt import tenant_cache_salt
from scheduler.config import CacheConfig, SchedulerConfig
from scheduler.program import CallNode, Program
from scheduler.replica import make_replicas
from scheduler.router import Router

pytest.importorskip("torch")
from engine_backend.torch.tiny import build_tiny_llama  # noqa: E402

KEYS = {"k-alice-3b1f": "alice", "k-bob-77c0": "bob"}
ALICE_KEY, BOB_KEY = KEYS
# About 380 prompt tokens on the sim tokenizer once rendered as a chat.
SECRET = ("Confidential merger memo for the board. " + " ".join(
    f"Clause {i}: the acquiring party pays {i * 37} million on closing day {i}." for i in range(24)))


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({hash_key(k): t for k, t in KEYS.items()}))
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def serve(serve_in_thread, keys_file: Path, engine: str, tiny: Path | None, share: bool):
    extra = {"torch": {"model_path": str(tiny)}} if engine == "torch" else \
        {"sim": {"time_scale": 0.01}}
    settings = Settings(api_keys=keys_file, engine=engine, cache={"share_across_tenants": share},
                        **extra)
    return serve_in_thread(create_app(ServerRuntime(settings)))


def chat_cached(url: str, key: str, text: str) -> tuple[int, int]:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": text}], max_tokens=2)
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


def generate_cached(url: str, key: str, text: str) -> int:
    resp = httpx.post(url + "/generate", headers={"Authorization": f"Bearer {key}"},
                      json={"text": text, "sampling_params": {"max_new_tokens": 2}}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()["meta_info"]["cached_tokens"]


@pytest.mark.parametrize("engine", ["sim", "torch"])
def test_a_cache_hit_never_crosses_tenants(serve_in_thread, keys_file, tiny_model, engine):
    server = serve(serve_in_thread, keys_file, engine, tiny_model, share=False)
    prompt_tokens, cached = chat_cached(server.url, ALICE_KEY, SECRET)
    assert prompt_tokens > 300 and cached == 0
    # Alice's own repeat is served from the cache: isolation does not switch caching off.
    assert chat_cached(server.url, ALICE_KEY, SECRET)[1] >= prompt_tokens - 1 - 16
    # Bob's probe with the very same text finds nothing: no hit, so no signal.
    assert chat_cached(server.url, BOB_KEY, SECRET) == (prompt_tokens, 0)
    # The same on the native route, with a text Alice sent there first.
    assert generate_cached(server.url, ALICE_KEY, "A" + SECRET) == 0
    assert generate_cached(server.url, ALICE_KEY, "A" + SECRET) > 300
    assert generate_cached(server.url, BOB_KEY, "A" + SECRET) == 0


@pytest.mark.parametrize("engine", ["sim", "torch"])
def test_share_across_tenants_restores_sharing(serve_in_thread, keys_file, tiny_model, engine):
    server = serve(serve_in_thread, keys_file, engine, tiny_model, share=True)
    prompt_tokens, cached = chat_cached(server.url, ALICE_KEY, SECRET)
    assert prompt_tokens > 300 and cached == 0
    assert chat_cached(server.url, BOB_KEY, SECRET)[1] >= prompt_tokens - 1 - 16


# --------------------------------------------------------------------------- the mechanism

_keys = st.lists(st.integers(0, 3), min_size=1, max_size=12)
_ops = st.lists(st.tuples(st.sampled_from([None, "alice", "bob"]), _keys), max_size=40)


def _reference_match(inserted: set[tuple[int, ...]], key: list[int]) -> int:
    return max((n for k in inserted for n in range(len(key) + 1)
                if tuple(key[:n]) == k[:n] and n <= len(k)), default=0)


def _distinct_prefixes(inserted: set[tuple[int, ...]]) -> int:
    return len({k[:n] for k in inserted for n in range(1, len(k) + 1)})


@settings(max_examples=100, deadline=None)
@given(_ops, _keys)
def test_radix_namespaces_never_share_and_cost_no_size(ops, probe):
    cache = RadixCache(store_values=True)
    inserted: dict[str | None, set[tuple[int, ...]]] = {None: set(), "alice": set(), "bob": set()}
    slot = iter(range(1, 10**6))
    for namespace, key in ops:
        present = cache.insert(key, [next(slot) for _ in key], namespace=namespace)
        assert present == _reference_match(inserted[namespace], key)
        inserted[namespace].add(tuple(key))
    for namespace, keys in inserted.items():
        match = cache.match_prefix(probe, namespace=namespace)
        assert match.length == _reference_match(keys, probe) == len(match.value)
        cache.inc_lock_ref(match.node)  # a lock inside a namespace releases cleanly
        cache.dec_lock_ref(match.node)
    # A namespace root holds no tokens: the size is the namespaces' own tokens only.
    assert cache.total_size() == sum(_distinct_prefixes(k) for k in inserted.values())
    freed: list[int] = []
    cache.on_evict = freed.extend
    cache.evict(cache.total_size())
    assert cache.total_size() == 0 and len(freed) == len(set(freed)) == sum(
        _distinct_prefixes(k) for k in inserted.values())
    assert cache.match_prefix(probe, namespace="alice").length == 0


def _routed_call(cache: CacheConfig, n: int, tenant: str, tokens: list[int]) -> CallNode:
    program = Program(id=f"p{n}", tenant=tenant, arrival=0, seq=n,
                      cache_salt=tenant_cache_salt(cache, tenant))
    node = CallNode(id=f"c{n}", program=program, kind="llm", seq=n, created_at=0)
    node.request = GenerateRequest(rid=node.id, input_ids=tokens)
    node.prompt_len, node.budget_tokens = len(tokens), len(tokens) + 16
    return node


@pytest.mark.parametrize("share", [False, True])
def test_the_routers_trees_are_namespaced_like_the_engines(share):
    """The router must not send Bob's call towards Alice's cached prefix (its choice is
    observable: the replica a call ran on, and its latency)."""
    cache = CacheConfig(share_across_tenants=share)
    config = SchedulerConfig()
    replicas = make_replicas([SimEngine() for _ in range(3)], config)
    router = Router(config, replicas)
    secret = list(range(1000, 1400))
    first = _routed_call(cache, 0, "alice", secret)
    router.on_dispatch(first, replicas[2])
    router.on_finish(first, replicas[2], [])
    alice_again = router.choose(_routed_call(cache, 1, "alice", secret + [7]))
    assert alice_again.replica is replicas[2] and alice_again.estimated_hit == 400
    bob = router.choose(_routed_call(cache, 2, "bob", secret + [7]))
    if share:
        assert bob.replica is replicas[2] and bob.estimated_hit == 400
    else:
        assert bob.replica is replicas[0] and bob.estimated_hit == 0
        assert router.best_match(_routed_call(cache, 3, "bob", secret)) == 0

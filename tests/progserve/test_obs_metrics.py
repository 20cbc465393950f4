"""`/metrics`: Prometheus text that prometheus-client's own parser reads, with the metrics
the issue lists; and tenant isolation of metrics labels and of the UI's program API."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from obs_support import live_server, mapreduce_spec, run_program, sim_settings
from prometheus_client.parser import text_string_to_metric_families

from progserve.auth import hash_key


def _families(text: str) -> dict[str, list]:
    """family name -> samples (the parser drops counters' `_total` from family names)."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list, name: str, **labels: str) -> float:
    matching = [
        s.value for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]  # fmt: skip
    assert matching, (name, labels)
    return sum(matching)


async def test_metrics_parse_and_include_the_listed_metrics() -> None:
    async with live_server(sim_settings()) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            for _ in range(3):
                await run_program(client, mapreduce_spec(3))
            response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    fams = _families(response.text)
    llm_calls = 3 * 4  # three maps and a reduce per program
    # queue depth per MLFQ level (atlas: 8 levels, all drained now)
    depth = fams["progserve_queue_depth"]
    assert sorted(int(s.labels["level"]) for s in depth) == list(range(8))
    assert all(s.value == 0 for s in depth)
    # in-flight per replica
    assert {s.labels["replica"] for s in fams["progserve_inflight_requests"]} == {"0", "1"}
    # TTFT and token-latency histograms
    ttft = fams["progserve_ttft_seconds"]
    assert _value(ttft, "progserve_ttft_seconds_count") == llm_calls
    assert _value(ttft, "progserve_ttft_seconds_bucket", le="+Inf") == llm_calls
    assert _value(ttft, "progserve_ttft_seconds_sum") > 0
    tpot = fams["progserve_time_per_output_token_seconds"]
    assert _value(tpot, "progserve_time_per_output_token_seconds_count") == llm_calls
    ptl = fams["progserve_program_token_latency_seconds"]
    assert _value(ptl, "progserve_program_token_latency_seconds_count") == 3
    # cache hit rate: the programs share a system prompt
    hit_rate = _value(fams["progserve_cache_hit_rate"], "progserve_cache_hit_rate")
    assert 0 < hit_rate < 1
    cached = _value(fams["progserve_tokens"], "progserve_tokens_total", type="cached")
    prompt = _value(fams["progserve_tokens"], "progserve_tokens_total", type="prompt")
    assert abs(hit_rate - cached / prompt) < 1e-9
    assert {s.labels["replica"] for s in fams["progserve_engine_cache_hit_rate"]} == {"0", "1"}
    # program counts
    assert _value(fams["progserve_programs_started"], "progserve_programs_started_total") == 3
    assert (
        _value(
            fams["progserve_programs_ended"], "progserve_programs_ended_total", status="finished"
        )
        == 3
    )
    assert _value(fams["progserve_programs"], "progserve_programs", status="finished") == 3
    # tool latencies
    tools = fams["progserve_tool_latency_seconds"]
    assert _value(tools, "progserve_tool_latency_seconds_count", tool="search_docs") == 3
    # KV admission: the programs ended, nothing waits or counts
    assert _value(fams["progserve_admission_held_programs"],
                  "progserve_admission_held_programs") == 0  # fmt: skip
    assert _value(fams["progserve_admission_kv_demand_tokens"],
                  "progserve_admission_kv_demand_tokens") == 0  # fmt: skip
    # preemptions (scheduler and engine side)
    assert "progserve_scheduler_preemptions" in fams
    assert "progserve_engine_preemptions" in fams
    assert _value(fams["progserve_engine_busy_seconds"], "progserve_engine_busy_seconds_total",
                  replica="0") > 0  # the sim engine ran the calls above  # fmt: skip
    assert _value(fams["progserve_calls"], "progserve_calls_total", kind="llm",
                  outcome="finished") == llm_calls  # fmt: skip


async def test_tenants_see_only_their_own_labels_and_programs(tmp_path: Path) -> None:
    keys = {"k-admin": "admin", "k-acme": "acme", "k-globex": "globex"}
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({hash_key(k): tenant for k, tenant in keys.items()}))
    auth = {k: {"Authorization": f"Bearer {k}"} for k in keys}
    async with live_server(sim_settings(api_keys=keys_file)) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            acme_program = await run_program(client, mapreduce_spec(2), headers=auth["k-acme"])
            globex_program = await run_program(client, mapreduce_spec(2), headers=auth["k-globex"])
            assert (await client.get("/metrics")).status_code == 401
            assert (await client.get("/ui/api/programs")).status_code == 401
            as_acme = (await client.get("/metrics", headers=auth["k-acme"])).text
            as_admin = (await client.get("/metrics", headers=auth["k-admin"])).text
            acme_list = (await client.get("/ui/api/programs", headers=auth["k-acme"])).json()
            admin_list = (await client.get("/ui/api/programs", headers=auth["k-admin"])).json()
            peek = await client.get(f"/ui/api/programs/{globex_program}", headers=auth["k-acme"])
            peek2 = await client.get(
                f"/ui/api/programs/{globex_program}?tenant=globex", headers=auth["k-acme"]
            )
            own = await client.get(f"/ui/api/programs/{acme_program}", headers=auth["k-acme"])
            # tenants may reuse a program id: each sees only its own program under it
            same = {**mapreduce_spec(1, with_tool=False), "program_id": "same-name"}
            await run_program(client, same, headers=auth["k-acme"])
            await run_program(client, {**same, "inputs": {"chunk_0": "globex data"}},
                              headers=auth["k-globex"])  # fmt: skip
            acme_same = await client.get("/ui/api/programs/same-name", headers=auth["k-acme"])
            admin_same = await client.get(
                "/ui/api/programs/same-name?tenant=globex", headers=auth["k-admin"]
            )

    def tenants(text: str) -> set[str]:
        return {
            s.labels["tenant"]
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if "tenant" in s.labels
        }

    assert tenants(as_admin) == {"acme", "globex"}
    assert tenants(as_acme) == {"acme"}
    assert "globex" not in as_acme
    # aggregates are the server's load (every tenant's calls): for admins only (issue 18.7)
    assert "progserve_ttft_seconds_count" in as_admin
    assert "progserve_ttft_seconds" not in as_acme and "progserve_scheduler" not in as_acme
    assert "progserve_tenant_calls_total" in as_acme
    assert [p["id"] for p in acme_list["programs"]] == [acme_program]
    assert {p["id"] for p in admin_list["programs"]} == {acme_program, globex_program}
    assert peek.status_code == 404 and "globex" not in peek.text  # as if it did not exist
    assert own.status_code == 200 and own.json()["program"]["tenant"] == "acme"
    assert peek2.status_code == 404
    for view, tenant in ((acme_same.json(), "acme"), (admin_same.json(), "globex")):
        assert view["program"]["tenant"] == tenant and view["program"]["llm_calls"] == 2
        assert {s["attributes"]["progserve.tenant"] for s in view["spans"]} == {tenant}
    assert acme_same.json()["trace_id"] != admin_same.json()["trace_id"]


def test_gc_pauses_are_a_bounded_histogram_per_generation() -> None:
    """Observed from inside the cycle collector: fixed counters (no list that grows until
    the next scrape), rendered as a Prometheus histogram with inclusive bounds."""
    from progserve.metrics import Metrics

    metrics = Metrics()
    for _ in range(10_000):
        metrics.observe_gc_pause(0, 0.0002)
    metrics.observe_gc_pause(2, 0.01)  # on a bound: counted in le="0.01"
    metrics.observe_gc_pause(2, 3.0)  # past the last bound: +Inf only
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.render().decode())
               if family.name == "progserve_gc_pause_seconds" for s in family.samples}
    gen0, gen2 = (("generation", "0"),), (("generation", "2"),)
    assert samples[("progserve_gc_pause_seconds_count", gen0)] == 10_000
    assert samples[("progserve_gc_pause_seconds_bucket", (*gen0, ("le", "0.0005")))] == 10_000
    assert samples[("progserve_gc_pause_seconds_bucket", (*gen2, ("le", "0.005")))] == 0
    assert samples[("progserve_gc_pause_seconds_bucket", (*gen2, ("le", "0.01")))] == 1
    assert samples[("progserve_gc_pause_seconds_bucket", (*gen2, ("le", "1.0")))] == 1
    assert samples[("progserve_gc_pause_seconds_bucket", (*gen2, ("le", "+Inf")))] == 2
    assert samples[("progserve_gc_pause_seconds_sum", gen2)] == 3.01
    assert not [k for k in samples if ("generation", "1") in k[1]]  # none observed

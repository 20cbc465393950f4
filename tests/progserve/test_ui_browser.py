"""The tracing UI in a real browser: Debian's chromium driven by Playwright (never
`playwright install`). A real map-reduce program runs through a real server; the page
must draw that program's DAG and its Gantt timeline; screenshots go to artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from obs_support import REPO, live_server, mapreduce_spec, run_program, sim_settings

async_playwright = pytest.importorskip("playwright.async_api").async_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO / "artifacts"
MAPS = 6

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists() and shutil.which("chromium") is None,
        reason="Debian chromium is not installed (scripts/install_browser.sh)",
    ),
]

# A bench result in the `progserve bench --json` shape (the keys the bench issue fixes).
BENCH = {
    "workload": "mixed", "programs": 2000, "replicas": 4, "seed": 1, "load_point": 3.2,
    "policies": {
        name: {
            "max_rate_at_slo": rate, "p50_token_latency": p50, "p95_token_latency": p95,
            "p99_token_latency": p95 * 1.6, "mean_token_latency": p50 * 1.3,
            "cache_hit_rate": hit,
            "at_load": {
                "mean_token_latency": p50 * 1.4, "p50_token_latency": p50,
                "p95_token_latency": p95,
                "p95_by_type": {"chat": p95 * 0.6, "bfcl": p95 * 0.9, "lats": p95 * 1.3,
                                "mapreduce": p95},
            },
        }
        for name, rate, p50, p95, hit in (
            ("fcfs", 3.2, 0.060, 0.41, 0.61), ("mlfq", 4.1, 0.041, 0.27, 0.58),
            ("plas", 5.6, 0.030, 0.19, 0.70), ("atlas", 5.9, 0.028, 0.17, 0.72),
        )
    },
    "retention": {
        "policy": "plas", "rate": 43.1, "kv_capacity_tokens": 63909,
        "lru": {"cache_hit_rate": 0.797}, "retention": {"cache_hit_rate": 0.888},
        "cache_hit_gain_points": 9.1,
        "curve": [
            {"kv_capacity_tokens": c, "lru_cache_hit_rate": lru, "retention_cache_hit_rate": ret,
             "lru_mean_token_latency": lru_s, "retention_mean_token_latency": ret_s,
             "ended_first_cache_hit_rate": (lru + ret) / 2,
             "ended_first_mean_token_latency": (lru_s + ret_s) / 2}
            for c, lru, ret, lru_s, ret_s in ((55362, 0.713, 0.919, 0.085, 0.050),
                                              (63909, 0.797, 0.941, 0.076, 0.040),
                                              (65131, 0.807, 0.947, 0.070, 0.038))
        ],
    },
}  # fmt: skip


async def test_ui_draws_the_dag_and_timeline_of_a_mapreduce_program(tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    # least_loaded spreads the parallel maps over both replicas: two lanes in the timeline
    async with live_server(sim_settings(scheduler={"balance": "least_loaded"})) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            await run_program(client, mapreduce_spec(2, with_tool=False))  # a neighbour
            program_id = await run_program(client, mapreduce_spec(MAPS))
            api = (await client.get(f"/ui/api/programs/{program_id}")).json()
        call_ids = {f"map-{i}" for i in range(MAPS)} | {"search", "reduce"}
        assert {c["id"] for c in api["calls"]} == call_ids
        replica_of = {c["id"]: c["replica"] for c in api["calls"]}

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{srv.url}/ui/#/program/{program_id}")
            await page.wait_for_function(
                f"document.querySelectorAll('#gantt g.bar').length === {len(call_ids)}",
                timeout=15_000,
            )
            # the program list
            row = page.locator(f'#programs tr[data-program="{program_id}"]')
            await row.wait_for()
            assert "finished" in await row.inner_text()
            assert await page.locator("#programs tbody tr").count() == 2
            # the DAG: a node per call, edges from the variables each call reads
            nodes = await page.eval_on_selector_all(
                "#dag g.node", "els => els.map(e => [e.dataset.call, e.getAttribute('class')])"
            )
            assert {n for n, _ in nodes} == call_ids
            assert all(("node-tool" in cls) == (n == "search") for n, cls in nodes)
            edges = set(await page.eval_on_selector_all(
                "#dag path.edge", "els => els.map(e => e.dataset.edge)"
            ))  # fmt: skip
            expected = {f"map-{i}->reduce" for i in range(MAPS)} | {
                "map-0->search", "search->reduce",
            }  # fmt: skip
            assert edges == expected
            # the layers: maps first, then the search, then the reduce
            x_of = dict(await page.eval_on_selector_all(
                "#dag g.node",
                "els => els.map(e => [e.dataset.call, e.transform.baseVal[0].matrix.e])",
            ))  # fmt: skip
            assert x_of["map-0"] < x_of["search"] < x_of["reduce"]
            # the timeline: a bar per call in its replica's lane, the tool in "tools"
            bars = dict(await page.eval_on_selector_all(
                "#gantt g.bar", "els => els.map(e => [e.dataset.call, e.dataset.lane])"
            ))  # fmt: skip
            assert set(bars) == call_ids
            for call_id, lane in bars.items():
                want = "tools" if call_id == "search" else f"replica {replica_of[call_id]}"
                assert lane == want, (call_id, lane)
            decode = await page.locator("#gantt g.bar .seg-decode").count()
            assert decode == MAPS + 1  # every LLM call decoded
            assert await page.locator("#gantt .seg-cache").count() >= 1  # shared prefix hits
            assert await page.locator("#gantt .seg-tool").count() == 1
            assert await page.locator("#calls tbody tr").count() == len(call_ids)
            await page.screenshot(path=str(ARTIFACTS / "ui-mapreduce.png"), full_page=True)

            # the compare view renders a bench JSON as charts
            bench_file = tmp_path / "bench.json"
            bench_file.write_text(__import__("json").dumps(BENCH))
            await page.goto(f"{srv.url}/ui/#/compare")
            await page.set_input_files("#bench-file", str(bench_file))
            await page.wait_for_selector(".chart svg[data-chart]")
            charts = await page.eval_on_selector_all(
                ".chart svg[data-chart]", "els => els.map(e => e.dataset.chart)"
            )
            assert any(c.startswith("Throughput at SLO") for c in charts)
            assert any(c.startswith("p95 token latency by program type") for c in charts)
            rate_bars = await page.eval_on_selector_all(
                '.chart svg[data-chart^="Throughput"] rect[data-category]',
                "els => els.map(e => e.dataset.category)",
            )
            assert rate_bars == ["fcfs", "mlfq", "plas", "atlas"]
            retention = await page.eval_on_selector_all(
                '.chart svg[data-chart^="KV retention: cache hit"] rect[data-category]',
                "els => els.map(e => [e.dataset.category, e.dataset.series])",
            )
            assert len(retention) == 9  # 3 capacities x (LRU, retention, hint alone)
            assert ["63.9k", "retention"] in retention
            latency = await page.eval_on_selector_all(
                '.chart svg[data-chart^="KV retention: mean program token latency"] '
                'rect[data-category]', "els => els.length",
            )
            assert latency == 9
            assert "mixed" in await page.inner_text("#bench-meta")
            await page.screenshot(path=str(ARTIFACTS / "ui-compare.png"), full_page=True)
            await browser.close()
            assert errors == []

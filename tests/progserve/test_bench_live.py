"""`progserve bench calibrate` and `progserve bench live` on the torch engine with the tiny
model: a profile the sim loads, and a live run with every contract key of issue 23."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")

from engine_backend.sim.cost_model import (  # noqa: E402
    StepCostModel,
    load_hardware_profile,
    profile_for_step_costs,
)
from progserve.bench.calibrate import fit, predicted  # noqa: E402
from progserve.bench.live_clients import counter_delta, parse_prometheus  # noqa: E402
from progserve.cli import main as cli_main  # noqa: E402
from tests.engine_backend.torch_support import tiny_dirs, tiny_gqa  # noqa: E402,F401


def test_profile_round_trips_step_costs() -> None:
    costs = StepCostModel(0.01, 0.02, 3e-3, 1e-6, 2e-8)
    from engine_backend.sim.config import HardwareProfile

    shape = HardwareProfile(params=1.35e8, bytes_per_param=4, num_layers=30,
                            hidden_size=576, kv_heads=3, head_dim=64, kv_bytes_per_elem=4)
    back = StepCostModel.from_hardware(profile_for_step_costs(costs, shape))
    for name in StepCostModel.__slots__:
        assert math.isclose(getattr(back, name), getattr(costs, name), rel_tol=1e-9)


def test_fit_recovers_known_step_costs() -> None:
    truth = StepCostModel(0.004, 0.01, 2e-4, 3e-7, 4e-9)
    prefill = [{"prefill_tokens": n, "chunk": 512} for n in (20, 100, 300, 700, 1200)]
    decode = [{"batch": b, "context": b * c} for b in (1, 2, 4, 8, 16, 64, 128)
              for c in (64, 512)]
    for point in prefill + decode:
        point["seconds"] = predicted(truth, point)
    got = fit(prefill, decode)
    for point in prefill + decode:
        assert predicted(got, point) == pytest.approx(point["seconds"], rel=1e-6)


def test_vllm_counters_parse_and_delta() -> None:
    text = ('# HELP x\nvllm:prefix_cache_hits_total{model_name="m"} 128.0\n'
            'vllm:prefix_cache_queries_total{model_name="m"} 512.0\n'
            'vllm:num_preemptions_total{model_name="m",engine="0"} 2.0\n'
            'vllm:other_total 5\n')
    after = parse_prometheus(text)
    assert after == {"prefix_cache_hits": 128.0, "prefix_cache_queries": 512.0,
                     "preemptions": 2.0}
    delta = counter_delta({"prefix_cache_hits": 64.0, "prefix_cache_queries": 256.0}, after)
    assert delta["prefix_cache_hit_rate"] == pytest.approx(0.25)


def test_calibrate_then_live_on_the_torch_engine(tiny_gqa: Path,  # noqa: F811
                                                 tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    assert cli_main(["bench", "calibrate", "--engine", "torch", "--model", str(tiny_gqa),
                     "--json", str(profile), "--repeats", "1", "--prefill-sizes", "16,48",
                     "--decode-batches", "1,2", "--decode-contexts", "16",
                     "--decode-tokens", "3"]) == 0
    cal = json.loads(profile.read_text())
    assert cal["measurements"]["prefill"] and cal["measurements"]["decode"]
    hardware = load_hardware_profile(profile)
    assert StepCostModel.from_hardware(hardware).step_time(64, 2080, 0, 0) > 0

    out = tmp_path / "live.json"
    assert cli_main(["bench", "live", "--engine", "torch", "--model", str(tiny_gqa),
                     "--workload", "bfcl", "--programs", "2", "--rate", "4",
                     "--token-scale", "0.1", "--tool-scale", "0.05",
                     "--policies", "engine,atlas", "--kv-tokens", "2048",
                     "--hardware", str(profile), "--json", str(out),
                     "--plot", str(tmp_path / "live.png")]) == 0
    report = json.loads(out.read_text())
    assert report["engine"]["kind"] == "torch" and report["engine"]["kv_tokens"] == 2048
    for name in ("engine", "atlas"):
        run = report["runs"][name]
        assert run["programs"] == 2 and run["tokens"] > 0
        assert run["mean_token_latency"] > 0 and run["p95_token_latency"] > 0
        assert 0.0 <= run["cache_hit_rate"] <= 1.0
        # bfcl programs resend their growing context: the engine's prefix cache hits
        assert run["cached_tokens"] > 0
        assert run["engine_counters"]["prefix_cache_queries"] > 0
        assert all(c["ttft"] is not None for p in run["per_program"] for c in p["calls"])
        assert report["sim"][name]["mean_token_latency"] > 0
    assert report["fidelity"]["mean_abs_rel_error"] >= 0
    assert report["fidelity"]["ratio_error"] >= 0
    ratio = report["runs"]["atlas"]["mean_token_latency"] / \
        report["runs"]["engine"]["mean_token_latency"]
    assert report["comparison"]["mean_ratio"] == pytest.approx(ratio)
    assert (tmp_path / "live.png").stat().st_size > 0

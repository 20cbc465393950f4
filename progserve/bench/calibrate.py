"""Calibrate the sim to a real engine: measure its step costs and fit the hardware profile the sim loads (`--hardware PROFILE`).

`progserve bench calibrate --engine torch|openai [--engine-url URL] --json PROFILE`

Measured through the engine's own API, as a user sees it (so the fit includes the
serving stack's per-step overhead), each point a median of `--repeats`:
- prefill: one request of n fresh prompt tokens and one output token; its time to the
  first token is its prefill steps (one per chunk of `chunked_prefill_tokens`);
- decode: B concurrent requests of C fresh prompt tokens and K output tokens each; once
  every request has its first token, the batch decodes together, and the step time is
  the mean gap between a request's streamed tokens over that stretch, at context
  B * (C + K / 2).
The five coefficients of `StepCostModel.step_time` (per-step overhead, weights floor,
GEMM time per token, decode attention per context token, prefill attention per query-key
pair) are fitted to these points by least squares on relative error, bounded at zero,
and written as the `HardwareProfile` (`cost_model.profile_for_step_costs`) whose cost
model they are. The file also keeps the points, the coefficients and each point's fit
error, so how well the sim's formula matches the engine can be read off it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from engine_backend.sim.config import HardwareProfile
from engine_backend.sim.cost_model import StepCostModel, profile_for_step_costs

from .live_clients import DirectEngineCaller, OpenAICaller, served_model
from .live_programs import TextRenderer, one_token_words

PREFILL_SIZES = (16, 64, 128, 256, 512)
DECODE_BATCHES = (1, 2, 4, 8)
DECODE_CONTEXTS = (64, 384)
DECODE_TOKENS = 16


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=("torch", "openai", "sglang"), default="torch")
    parser.add_argument("--engine-url", default=None)
    parser.add_argument("--model", default=None,
                        help="model dir (torch: served; else: its shape and tokenizer); "
                             "default: the embedded SmolLM2")
    parser.add_argument("--json", type=Path, required=True, help="the profile to write")
    parser.add_argument("--prefill-sizes", default=",".join(map(str, PREFILL_SIZES)))
    parser.add_argument("--decode-batches", default=",".join(map(str, DECODE_BATCHES)))
    parser.add_argument("--decode-contexts", default=",".join(map(str, DECODE_CONTEXTS)))
    parser.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-tokens", type=int, default=2048,
                        help="openai/sglang: the server's prefill chunk (vLLM: "
                             "--max-num-batched-tokens); torch: its own config's")
    parser.add_argument("--kv-tokens", type=int, default=None, help="torch: KV pool")
    parser.add_argument("--max-running", type=int, default=None, help="torch: batch cap")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class Prompts:
    """Fresh prompts of n one-token words (never a cached prefix: a counter leads)."""

    def __init__(self, words: tuple[str, ...]) -> None:
        self.render = TextRenderer(words)
        self.cursor = 1 << 30

    def __call__(self, n: int) -> list[dict[str, str]]:
        start = self.cursor
        self.cursor += n
        return [{"role": "user", "content": self.render.text(range(start, start + n))}]


async def measure_prefill(call: Any, prompts: Prompts, sizes: list[int], repeats: int,
                          chunk: int) -> list[dict[str, float]]:
    points = []
    for n in sizes:
        times, tokens = [], 0
        for _ in range(repeats):
            record, _ = await call("calibrate", 0, prompts(n), 1, True)
            times.append(record.ttft if record.ttft is not None else record.end - record.start)
            tokens = record.prompt_tokens
        points.append({"prefill_tokens": tokens, "chunk": chunk,
                       "seconds": statistics.median(times)})
    return points


async def measure_decode(call: Any, prompts: Prompts, batches: list[int], contexts: list[int],
                         steps: int, repeats: int) -> list[dict[str, float]]:
    points = []
    for context in contexts:
        for batch in batches:
            samples, prompt_tokens = [], 0
            for _ in range(repeats):
                records = await asyncio.gather(*(
                    call("calibrate", i, prompts(context), steps, True) for i in range(batch)))
                together = max(r.token_times[0] for r, _ in records if r.token_times)
                gaps = []
                for record, _ in records:
                    later = [t for t in record.token_times if t >= together]
                    if len(later) >= 2:
                        gaps.append((later[-1] - later[0]) / (len(later) - 1))
                if gaps:
                    samples.append(statistics.mean(gaps))
                prompt_tokens = records[0][0].prompt_tokens
            if samples:
                points.append({"batch": batch, "context": batch * (prompt_tokens + steps / 2),
                               "seconds": statistics.median(samples)})
    return points


def prefill_chunks(point: dict[str, float]) -> list[tuple[int, int]]:
    """(tokens, attention pairs) of each prefill step of a prompt (chunked prefill)."""
    n, chunk = int(point["prefill_tokens"]), int(point.get("chunk") or point["prefill_tokens"])
    out = []
    for a in range(0, n, max(chunk, 1)):
        b = min(n, a + chunk)
        out.append((b - a, (b * (b + 1) - a * (a + 1)) // 2))
    return out


def predicted(costs: StepCostModel, point: dict[str, float]) -> float:
    if "prefill_tokens" in point:
        return sum(costs.step_time(t, pairs, 0, 0) for t, pairs in prefill_chunks(point))
    return costs.step_time(0, 0, int(point["batch"]), int(point["context"]))


def fit(prefill: list[dict[str, float]], decode: list[dict[str, float]]) -> StepCostModel:
    """Least squares on relative error of `StepCostModel.step_time`, coefficients >= 0.

    `step_time` is linear in its five coefficients once it is known which points sit on
    the weights floor (`max(weights, tokens * per_token)`): that is every point with at
    most k tokens for some k, so each split is tried and the best consistent fit kept."""
    points = prefill + decode
    tokens = [_tokens(p) for p in points]
    best: tuple[float, StepCostModel] | None = None
    for split in sorted({0, *tokens}):
        costs = _fit_split(points, tokens, split)
        error = sum((predicted(costs, p) / p["seconds"] - 1.0) ** 2 for p in points)
        if best is None or error < best[0]:
            best = (error, costs)
    assert best is not None
    return best[1]


def _tokens(point: dict[str, float]) -> int:
    """Tokens of the point's (largest) step: what decides its side of the weights floor."""
    if "prefill_tokens" in point:
        return max(t for t, _ in prefill_chunks(point))
    return int(point["batch"])


def _fit_split(points: list[dict[str, float]], tokens: list[int], split: int) -> StepCostModel:
    """Non-negative least squares (active set: drop the most negative, refit) with the
    points of at most `split` tokens on the weights floor."""
    import numpy as np

    rows = []
    for point, n in zip(points, tokens, strict=True):
        steps = prefill_chunks(point) if "prefill_tokens" in point else [(n, 0)]
        on_floor = n <= split
        rows.append([float(len(steps)),
                     float(len(steps)) if on_floor else 0.0,
                     0.0 if on_floor else float(sum(t for t, _ in steps)),
                     float(point.get("context") or 0.0),
                     float(sum(pairs for _, pairs in steps))])
    a = np.array(rows) / np.array([[p["seconds"]] for p in points])
    b = np.ones(len(points))
    active = list(range(5))
    x = np.zeros(5)
    while active:
        norms = np.linalg.norm(a[:, active], axis=0)
        norms[norms == 0] = 1.0
        sol, *_ = np.linalg.lstsq(a[:, active] / norms, b, rcond=None)
        sol = sol / norms
        if (sol >= 0).all():
            x[:] = 0.0
            x[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return StepCostModel(*(float(v) for v in x))


def model_shape(model_dir: str) -> HardwareProfile:
    """The served model's shape from its config.json (fp32 on CPU)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    inter = int(config.get("intermediate_size", 4 * hidden))
    vocab = int(config.get("vocab_size", 0))
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    params = layers * (hidden * head_dim * (heads * 2 + kv_heads * 2) + 3 * hidden * inter) \
        + vocab * hidden
    return HardwareProfile(params=float(params), bytes_per_param=4.0, num_layers=layers,
                           hidden_size=hidden, kv_heads=kv_heads, head_dim=head_dim,
                           kv_bytes_per_elem=4.0)


async def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    model_dir = args.model
    if model_dir is None:
        from engine_backend.torch.smollm2 import ensure_smollm2

        model_dir = str(await asyncio.to_thread(ensure_smollm2))
    words = await asyncio.to_thread(one_token_words, model_dir)
    prompts = Prompts(words)
    engine = None
    wall = time.perf_counter()
    if args.engine == "torch":
        from engine_backend.torch import TorchEngine
        from engine_backend.torch.config import TorchConfig

        update: dict[str, Any] = {"model_path": model_dir}
        if args.kv_tokens:
            update["kv_capacity_tokens"] = args.kv_tokens
        if args.max_running:
            update["max_running"] = args.max_running
        torch_config = TorchConfig(**update)
        chunk = torch_config.chunked_prefill_tokens
        engine = await asyncio.to_thread(TorchEngine.from_pretrained, model_dir, torch_config)
        await engine.start()
        call: Any = DirectEngineCaller(engine)
    else:
        if not args.engine_url:
            raise SystemExit(f"--engine {args.engine} needs --engine-url")
        chunk = args.chunk_tokens
        call = OpenAICaller(args.engine_url, await served_model(args.engine_url),
                            tag_programs=False)
    call.track_tokens = True
    try:
        await call("calibrate", 0, prompts(16), 4, True)  # warm-up (first-call costs)
        prefill = await measure_prefill(call, prompts, _ints(args.prefill_sizes), args.repeats,
                                        chunk)
        decode = await measure_decode(call, prompts, _ints(args.decode_batches),
                                      _ints(args.decode_contexts), args.decode_tokens,
                                      args.repeats)
    finally:
        if engine is not None:
            await engine.close()
        else:
            await call.aclose()
    costs = await asyncio.to_thread(fit, prefill, decode)
    for point in prefill + decode:
        point["fit_seconds"] = predicted(costs, point)
        point["fit_rel_error"] = point["fit_seconds"] / point["seconds"] - 1.0
    errors = [abs(p["fit_rel_error"]) for p in prefill + decode]
    hardware = profile_for_step_costs(costs, model_shape(model_dir))
    return {
        "engine": {"kind": args.engine, "url": args.engine_url, "model": model_dir},
        "hardware": hardware.model_dump(),
        "step_costs": {"overhead_s": costs.overhead_s, "weights_s": costs.weights_s,
                       "per_token_s": costs.per_token_s,
                       "per_context_token_s": costs.per_context_token_s,
                       "per_attention_pair_s": costs.per_attention_pair_s},
        "measurements": {"prefill": prefill, "decode": decode},
        "fit": {"mean_abs_rel_error": sum(errors) / len(errors), "max_abs_rel_error": max(errors)},
        "wall_s": time.perf_counter() - wall,
    }


def main(args: argparse.Namespace) -> int:
    profile = asyncio.run(calibrate(args))
    args.json.write_text(json.dumps(profile, indent=1))
    costs = profile["step_costs"]
    print("step costs: " + ", ".join(f"{k} {v:.3g}" for k, v in costs.items()))
    fit_ = profile["fit"]
    print(f"fit: mean |rel error| {fit_['mean_abs_rel_error']:.1%}, "
          f"max {fit_['max_abs_rel_error']:.1%}; profile written to {args.json}")
    return 0

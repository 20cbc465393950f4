"""TorchEngine on a tiny random Llama: prefix reuse, batching, preemption and sampling must
never change what greedy decoding produces, and the engine must behave like an engine
(streams, aborts, typed errors, a free event loop)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine_backend.errors import InvalidRequestError, UnknownRequestError
from engine_backend.radix_cache import RETIRED
from engine_backend.torch.config import TorchConfig
from engine_backend.torch.engine import TorchEngine
from engine_backend.types import Chunk, FinishType, GenerateRequest, SamplingParams

pytest_plugins = ["torch_support"]  # tiny-model fixtures

SHARED = "The scheduler sees every program whole and decides which call runs next, "
PROMPTS = [
    SHARED + "so a long agent",
    SHARED + "because the radix tree",
    SHARED + "while tools run",
    "An unrelated prompt about kernels",
    SHARED,
]


def _engine(path: Path, **config: Any) -> TorchEngine:
    return TorchEngine.from_pretrained(path, TorchConfig(threads=1, **config))


def _request(rid: str, prompt: str | list[int], **sampling: Any) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_new_tokens", 12)
    spec = {"text": prompt} if isinstance(prompt, str) else {"input_ids": prompt}
    return GenerateRequest(rid=rid, sampling=SamplingParams(**sampling), **spec)


async def _collect(engine: TorchEngine, request: GenerateRequest) -> list[Chunk]:
    return [chunk async for chunk in engine.generate(request)]


def _ids(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def _one_at_a_time(engine: TorchEngine, prompts: list[str], **sampling: Any) -> list:
    return [_ids(await _collect(engine, _request(f"s{i}", p, **sampling))) for i, p in
            enumerate(prompts)]  # fmt: skip


async def _all_at_once(engine: TorchEngine, prompts: list[str], **sampling: Any) -> list:
    runs = [_collect(engine, _request(f"b{i}", p, **sampling)) for i, p in enumerate(prompts)]
    return [_ids(chunks) for chunks in await asyncio.gather(*runs)]


async def test_greedy_identical_with_and_without_prefix_reuse(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa, prefix_cache=False) as cold:
        loop = asyncio.get_running_loop()
        started = loop.time()
        expected = await _one_at_a_time(cold, PROMPTS)
        cold_stats = await cold.stats()
        assert cold_stats.cache_hit_tokens == 0
        assert 0 < cold_stats.busy_s <= loop.time() - started  # model steps, timed
    async with _engine(tiny_gqa, cascade_min_prefix=4) as warm:
        first = await _one_at_a_time(warm, PROMPTS)
        again = await _all_at_once(warm, PROMPTS)  # everything cached, decoded as a batch
        stats = await warm.stats()
    assert first == expected
    assert again == expected
    assert stats.cache_hit_tokens > len(PROMPTS) * 10  # the shared prefix was reused


async def test_batched_equals_one_at_a_time(tiny_mha: Path) -> None:
    async with _engine(tiny_mha, prefix_cache=False) as engine:
        # ignore_eos: a random model may pick EOS early; the check is about batching.
        alone = await _one_at_a_time(engine, PROMPTS, max_new_tokens=10, ignore_eos=True)
        together = await _all_at_once(engine, PROMPTS, max_new_tokens=10, ignore_eos=True)
    assert together == alone
    assert all(len(ids) == 10 for ids in alone)


async def test_chunked_prefill_matches_whole_prefill(tiny_gqa: Path) -> None:
    long_prompt = SHARED * 4
    async with _engine(tiny_gqa, chunked_prefill_tokens=16, prefix_cache=False) as engine:
        chunked = await _one_at_a_time(engine, [long_prompt])
    async with _engine(tiny_gqa, prefix_cache=False) as engine:
        whole = await _one_at_a_time(engine, [long_prompt])
    assert chunked == whole


async def test_cascade_attention_serves_forks_of_one_prefix(tiny_gqa: Path) -> None:
    prompts = [SHARED * 2 + tail for tail in ("a", "b", "c", "d")]
    async with _engine(tiny_gqa, prefix_cache=False) as plain:
        expected = await _one_at_a_time(plain, prompts)
    async with _engine(tiny_gqa, cascade_min_prefix=8) as engine:
        await _collect(engine, _request("warm", SHARED * 2, max_new_tokens=1))
        groups: list[Any] = []
        original = engine.batcher._decode_groups

        def spy(decode: list) -> list:
            out = original(decode)
            groups.extend(out)
            return out

        engine.batcher._decode_groups = spy  # type: ignore[method-assign]
        got = await _all_at_once(engine, prompts)
    assert got == expected
    cascades = [g for g in groups if g.prefix_indices is not None]
    assert cascades and max(g.end - g.start for g in cascades) == len(prompts)
    assert min(len(g.prefix_indices) for g in cascades) >= 8


async def test_logits_match_transformers_through_the_engine(tiny_gqa: Path) -> None:
    """Output logprobs (greedy) and prompt logprobs equal transformers' log-softmax."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gqa)
    hf = AutoModelForCausalLM.from_pretrained(tiny_gqa, dtype=torch.float32).eval()
    prompt = tokenizer(PROMPTS[0]).input_ids
    async with _engine(tiny_gqa) as engine:
        await _collect(engine, _request("warm", PROMPTS[1]))  # a cached prefix must not matter
        chunks = await _collect(
            engine,
            GenerateRequest(rid="lp", input_ids=prompt, return_logprob=True, logprob_start_len=3,
                            sampling=SamplingParams(temperature=0, max_new_tokens=6)),
        )  # fmt: skip
    output = _ids(chunks)
    out_lps = [e for c in chunks for e in (c.output_logprobs or [])]
    final = chunks[-1]
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt + output])).logits[0], -1)
    n = len(prompt)
    assert output == logprobs[n - 1 : n - 1 + len(output)].argmax(-1).tolist()
    for i, (lp, token, _) in enumerate(out_lps):
        assert token == output[i]
        assert math.isclose(lp, logprobs[n - 1 + i, token].item(), abs_tol=1e-4)
    assert final.input_logprobs is not None and len(final.input_logprobs) == n - 3
    for position, (lp, token, _) in zip(range(3, n), final.input_logprobs, strict=True):
        assert token == prompt[position]
        assert math.isclose(lp, logprobs[position - 1, token].item(), abs_tol=1e-4)
    assert final.prompt_tokens == n and final.completion_tokens == len(output)


async def test_prefill_only_request_returns_prompt_logprobs(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa) as engine:
        chunks = await _collect(
            engine,
            GenerateRequest(rid="sel", text=PROMPTS[2], return_logprob=True, logprob_start_len=0,
                            sampling=SamplingParams(max_new_tokens=0)),
        )  # fmt: skip
    final = chunks[-1]
    assert len(chunks) == 1 and final.token_ids == []
    assert final.finish_reason is not None and final.finish_reason.type is FinishType.LENGTH
    assert final.input_logprobs is not None
    assert final.input_logprobs[0][0] is None  # the first token has no context (SGLang)
    assert all(lp is not None and lp <= 0 for lp, _, _ in final.input_logprobs[1:])
    assert len(final.input_logprobs) == final.prompt_tokens


async def test_streamed_text_is_the_decoded_tokens(tiny_gqa: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_gqa)
    async with _engine(tiny_gqa, stream_interval=1) as engine:
        chunks = await _collect(
            engine, _request("t", PROMPTS[3], max_new_tokens=24, ignore_eos=True)
        )
    assert len(chunks) >= 2  # it streamed
    text = "".join(c.text for c in chunks)
    assert text == tokenizer.decode(_ids(chunks), skip_special_tokens=True)


async def test_stop_string_cuts_the_output(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa) as engine:
        free = await _collect(engine, _request("a", PROMPTS[0], max_new_tokens=20))
        text = "".join(c.text for c in free)
        # A two-character stop string from the second half: no spaces, no broken bytes.
        stop = next(
            text[i : i + 2]
            for i in range(len(text) // 2, len(text) - 1)
            if text[i : i + 2].isprintable()
            and not any(c.isspace() for c in text[i : i + 2])
            and "\ufffd" not in text[i : i + 2]
        )
        cut = await _collect(engine, _request("b", PROMPTS[0], max_new_tokens=20, stop=[stop]))
    got = "".join(c.text for c in cut)
    assert got == text[: text.index(stop)]
    assert cut[-1].finish_reason.type is FinishType.STOP
    assert cut[-1].finish_reason.matched == stop


async def test_stop_token_ids_and_min_new_tokens(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa) as engine:
        free = _ids(await _collect(engine, _request("a", PROMPTS[1], max_new_tokens=12)))
        stop_token = free[4]
        first = free.index(stop_token)
        cut = await _collect(
            engine, _request("b", PROMPTS[1], max_new_tokens=12, stop_token_ids=[stop_token])
        )
        assert _ids(cut) == free[: first + 1]
        assert cut[-1].finish_reason.matched == stop_token
        late = await _collect(
            engine,
            _request("c", PROMPTS[1], max_new_tokens=12, stop_token_ids=[stop_token],
                     min_new_tokens=first + 2),
        )  # fmt: skip
    late_ids = _ids(late)
    assert stop_token not in late_ids[: first + 2]


async def test_seeded_sampling_is_reproducible_in_any_batch(tiny_gqa: Path) -> None:
    # Hot enough that two seeds (or greedy) cannot agree on 16 tokens by chance.
    params = {"temperature": 2.0, "top_p": 0.95, "top_k": 100, "seed": 7, "max_new_tokens": 16}
    async with _engine(tiny_gqa) as engine:
        alone = _ids(await _collect(engine, _request("x", PROMPTS[0], **params)))
        runs = [_collect(engine, _request(f"y{i}", p, temperature=1.0, max_new_tokens=16))
                for i, p in enumerate(PROMPTS[1:])]  # fmt: skip
        crowd = await asyncio.gather(_collect(engine, _request("z", PROMPTS[0], **params)), *runs)
        other = _ids(await _collect(engine, _request("w", PROMPTS[0], **{**params, "seed": 8})))
        greedy = _ids(await _collect(engine, _request("g", PROMPTS[0], max_new_tokens=16)))
    assert _ids(crowd[0]) == alone
    assert other != alone  # the seed matters
    assert alone != greedy  # and it really sampled


def test_top_k_and_top_p_filters() -> None:
    from engine_backend.torch.sampling import RowSampling, sample_rows

    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 1.0]])
    seen: set[int] = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        tokens, _ = sample_rows(logits, [RowSampling(1.0, 1.0, 2, gen)])
        seen.add(tokens[0])
    assert seen == {1, 2}
    seen.clear()
    for _ in range(200):
        tokens, _ = sample_rows(logits, [RowSampling(1.0, 0.5, -1, gen)])
        seen.add(tokens[0])
    assert seen == {1}  # token 1 alone holds more than half the mass


async def test_priority_preempts_and_outputs_survive(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa, prefix_cache=False) as reference:
        expected = await _one_at_a_time(reference, PROMPTS[:3], max_new_tokens=40, ignore_eos=True)
    async with _engine(tiny_gqa, max_running=1) as engine:
        order: list[str] = []

        async def drain(rid: str, stream: Any, head: list[Chunk]) -> list[int]:
            chunks = head + [c async for c in stream]
            order.append(rid)
            return _ids(chunks)

        def start(rid: str, prompt: str, priority: float) -> Any:
            request = _request(rid, prompt, max_new_tokens=40, ignore_eos=True)
            request.priority = priority
            return engine.generate(request)

        low_stream = start("low", PROMPTS[0], 5.0)
        low_head = [await anext(low_stream)]  # low is decoding now
        low = asyncio.create_task(drain("low", low_stream, low_head))
        high, mid = await asyncio.gather(
            drain("high", start("high", PROMPTS[1], 0.0), []),
            drain("mid", start("mid", PROMPTS[2], 1.0), []),
        )
        low_ids = await low
        stats = await engine.stats()
    assert order == ["high", "mid", "low"]
    assert stats.preemptions >= 1
    assert [low_ids, high, mid] == expected


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
async def test_kv_pressure_retracts_without_changing_outputs(
    tiny_gqa: Path, preemption: str
) -> None:
    prompts = [p + " again" for p in PROMPTS[:4]]
    async with _engine(tiny_gqa, prefix_cache=False) as reference:
        expected = await _one_at_a_time(reference, prompts, max_new_tokens=48, ignore_eos=True)
    # Room for all four prompts but not for all their outputs: decoding must retract.
    config = {"kv_capacity_tokens": 160, "admission_reserve_tokens": 0, "preemption": preemption}
    async with _engine(tiny_gqa, **config) as engine:
        got = await _all_at_once(engine, prompts, max_new_tokens=48, ignore_eos=True)
        stats = await engine.stats()
    assert stats.preemptions >= 1
    if preemption == "swap":
        assert engine.batcher.swap_ins >= 1  # KV came back from host memory, not recomputed
    assert got == expected


async def test_abort_and_disconnect_free_the_kv(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa, prefix_cache=False) as engine:
        stream = engine.generate(_request("a", PROMPTS[0], max_new_tokens=500, ignore_eos=True))
        first = await anext(stream)
        assert first.finish_reason is None
        await engine.abort("a")
        rest = [c async for c in stream]
        assert rest[-1].finish_reason.type is FinishType.ABORT
        with pytest.raises(UnknownRequestError):
            await engine.abort("a")
        gone = engine.generate(_request("b", PROMPTS[1], max_new_tokens=500, ignore_eos=True))
        await anext(gone)
        await gone.aclose()  # the consumer leaves
        for _ in range(100):
            stats = await engine.stats()
            if stats.kv_used_tokens == 0 and stats.running == 0:
                break
            await asyncio.sleep(0.01)
    assert stats.kv_used_tokens == 0 and stats.running == 0
    assert stats.queue_len == 0
    # A request dropped before it was ever queued (e.g. while its grammar compiled).
    never_queued = engine._prepare(_request("c", [1, 2, 3]), [1, 2, 3]).request
    engine.batcher.abort(never_queued)
    assert engine.batcher.n_waiting == 0


async def test_bad_input_raises_typed_errors_before_streaming(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa, kv_capacity_tokens=64) as engine:
        with pytest.raises(InvalidRequestError):
            engine.generate(_request("a", [1, 2, 10_000]))
        with pytest.raises(InvalidRequestError):
            engine.generate(_request("b", list(range(100))))  # longer than the KV pool
        ok = await _collect(engine, _request("c", [5, 6, 7], max_new_tokens=2))
        # A long text is tokenized off the loop: its error comes with the first __anext__.
        long_text = engine.generate(_request("d", "tokens " * 3000))
        with pytest.raises(InvalidRequestError, match="the limit is"):
            await anext(long_text)
    assert ok[-1].finish_reason is not None


async def test_event_loop_stays_free_while_the_model_computes(tiny_gqa: Path) -> None:
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = loop.time()
            gaps.append(now - last)
            last = now

    async with _engine(tiny_gqa, chunked_prefill_tokens=2048) as engine:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        await _collect(engine, _request("long", SHARED * 8, max_new_tokens=8))
        stop.set()
        await tick
    assert gaps and max(gaps) < 0.25  # a blocked loop would stall for the whole prefill


async def test_retention_pins_a_programs_prefix(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa, kv_capacity_tokens=96, eviction="priority") as engine:
        request = _request("p1", SHARED, max_new_tokens=1)
        request.program_id = "prog"
        await _collect(engine, request)
        await engine.retain("prog", True)
        for i in range(4):  # other traffic fills the cache
            await _collect(engine, _request(f"o{i}", f"noise {i} " * 6, max_new_tokens=1))
        again = _request("p2", SHARED + " more", max_new_tokens=1)
        again.program_id = "prog"
        kept = await _collect(engine, again)
    assert (
        kept[-1].cached_tokens >= len(AutoTokenizer.from_pretrained(tiny_gqa)(SHARED).input_ids) - 1
    )


async def test_an_ended_programs_prefix_is_retired(tiny_gqa: Path) -> None:
    async with _engine(tiny_gqa, kv_capacity_tokens=96, eviction="priority") as engine:
        request = _request("p1", SHARED, max_new_tokens=1)
        request.program_id = "prog"
        await _collect(engine, request)
        await engine.program_ended("prog")
        assert engine.cache is not None
        ids = AutoTokenizer.from_pretrained(tiny_gqa)(SHARED).input_ids
        node = engine.cache.match_prefix(ids, touch=False).node
        assert node.priority == RETIRED  # the first to go under the priority order


async def test_regex_constrained_decoding(tiny_gqa: Path) -> None:
    pytest.importorskip("xgrammar")
    pattern = r"(yes|no)-[0-9]{2}"
    async with _engine(tiny_gqa) as engine:
        assert engine.capabilities().constrained_decoding
        chunks = await _collect(engine, _request("r", PROMPTS[0], max_new_tokens=16, regex=pattern))
        schema = '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}'
        js = await _collect(
            engine, _request("j", PROMPTS[1], max_new_tokens=64, json_schema=schema)
        )
        with pytest.raises(InvalidRequestError):
            await _collect(engine, _request("bad", PROMPTS[1], regex="(unclosed"))
    assert re.fullmatch(pattern, "".join(c.text for c in chunks))
    assert chunks[-1].finish_reason.type is FinishType.STOP
    import json

    assert isinstance(json.loads("".join(c.text for c in js))["ok"], bool)


async def test_random_traffic_keeps_outputs_and_leaks_no_slots(tiny_gqa: Path) -> None:
    """Many requests with shared prefixes, random priorities and random aborts, in a small
    KV pool: every stream ends, greedy outputs equal solo runs, and every slot is either
    free or held by the tree at the end."""
    import random

    rng = random.Random(5)
    prompts = [rng.choice(PROMPTS[:3]) + f" step {rng.randint(0, 3)}" for _ in range(14)]
    lengths = [rng.randint(4, 24) for _ in prompts]
    async with _engine(tiny_gqa, prefix_cache=False) as reference:
        expected = [
            _ids(await _collect(reference, _request(f"r{i}", p, max_new_tokens=n, ignore_eos=True)))
            for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
        ]
    config = {"kv_capacity_tokens": 110, "max_running": 4, "chunked_prefill_tokens": 24,
              "admission_reserve_tokens": 0, "cascade_min_prefix": 4}  # fmt: skip
    async with _engine(tiny_gqa, **config) as engine:

        async def run(i: int) -> tuple[int, list[Chunk]]:
            await asyncio.sleep(rng.random() * 0.05)
            request = _request(f"q{i}", prompts[i], max_new_tokens=lengths[i], ignore_eos=True)
            request.priority = float(rng.randint(0, 3))
            if i % 5 == 4:  # some are aborted mid-way
                stream = engine.generate(request)
                chunks = [await anext(stream)]
                with contextlib.suppress(UnknownRequestError):  # it may have just finished
                    await engine.abort(request.rid)
                return i, chunks + [c async for c in stream]
            return i, await _collect(engine, request)

        results = await asyncio.gather(*(run(i) for i in range(len(prompts))))
        stats = await engine.stats()
        assert engine.cache is not None
        assert engine.pool.used_slots == engine.cache.total_size()
        assert engine.cache.protected_size() == 0
        assert stats.preemptions > 0 and stats.cache_hit_tokens > 0  # the pressure was real
    for i, chunks in results:
        assert chunks[-1].finish_reason is not None
        if i % 5 != 4:
            assert _ids(chunks) == expected[i], i
        else:
            assert chunks[-1].finish_reason.type in (FinishType.ABORT, FinishType.LENGTH)
    assert stats.running == 0 and stats.queue_len == 0

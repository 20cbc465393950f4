"""The sim engine's parts: step-cost model, tokenizer, responders, pseudo-logprobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_backend.errors import InvalidRequestError, UnsupportedError
from engine_backend.sim import (
    ReplyBuilder,
    ScriptedResponder,
    SimConfig,
    SimEngine,
    SimTokenizer,
    StepCostModel,
    SyntheticResponder,
)
from engine_backend.sim.responders import PromptView, hash_text, parse_choices
from engine_backend.sim.tokenizer import EOS_ID
from engine_backend.types import Chunk, FinishType, GenerateRequest, SamplingParams
from engine_backend.virtual_time import run_virtual

COST = StepCostModel.llama3_8b_h100()
FIXTURE = Path(__file__).parents[1] / "fixtures" / "sim_script.json"

# ------------------------------------------------------------------------- cost model


def test_cost_model_matches_llama3_8b_h100_figures() -> None:
    batch1 = COST.step_time(0, 0, 1, 512)
    assert 0.0065 < batch1 < 0.008  # ~7 ms per token single stream
    for prompt in (1024, 8192):
        pairs = prompt * (prompt + 1) // 2
        throughput = prompt / COST.step_time(prompt, pairs, 0, 0)
        assert 10_000 < throughput < 20_000, (prompt, throughput)
    # attention grows with the KV read per step; GEMMs turn compute bound at large batch
    assert COST.step_time(0, 0, 64, 64 * 4096) > COST.step_time(0, 0, 64, 64 * 512) + 0.01
    assert COST.step_time(0, 0, 256, 0) > 1.5 * COST.step_time(0, 0, 32, 0)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 300), context=st.integers(0, 2_000_000), steps=st.integers(1, 500))
def test_decode_span_is_the_sum_of_its_steps(batch: int, context: int, steps: int) -> None:
    total = sum(COST.step_time(0, 0, batch, context + j * batch) for j in range(steps))
    assert COST.decode_span(batch, context, steps) == pytest.approx(total, rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(batch=st.integers(1, 300), context=st.integers(0, 2_000_000),
       seconds=st.floats(0, 50, allow_nan=False))
def test_decode_steps_within_inverts_the_span(batch: int, context: int, seconds: float) -> None:
    k = COST.decode_steps_within(batch, context, seconds)
    assert COST.decode_span(batch, context, k) <= seconds
    assert COST.decode_span(batch, context, k + 1) > seconds


# -------------------------------------------------------------------------- tokenizer


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=80))
def test_pieces_cover_the_text_exactly(text: str) -> None:
    assert "".join(SimTokenizer.split(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.from_regex(r"[A-Za-z0-9,.!?:]{1,8}", fullmatch=True), min_size=2,
                max_size=30), st.integers(1, 29))
def test_tokenization_is_prefix_stable_at_word_boundaries(words: list[str], cut: int) -> None:
    tok = SimTokenizer()
    full = tok.encode(" ".join(words))
    head = tok.encode(" ".join(words[: min(cut, len(words) - 1)]))
    assert full[: len(head)] == head


def test_tokenizer_is_deterministic_and_decodes() -> None:
    text = "Thought: I should call the calculator.\nAction: calculator[12 * 7]"
    a, b = SimTokenizer(), SimTokenizer()
    assert a.encode(text) == b.encode(text)
    assert a.decode(a.encode(text)) == text
    assert all(0 <= t < a.vocab_size for t in a.encode(text))
    assert b.decode([12345, 678]) == b.decode([12345, 678]) != ""  # unknown ids: pseudo-words


# ------------------------------------------------------------------------- responders


def view(builder: ReplyBuilder, rid: str, sampling: SamplingParams, text: str = "hi") -> PromptView:
    ids = builder.tokenizer.encode(text)
    # hash_text, not hash(): str hashes are salted per process, so replies would vary.
    return PromptView(rid, ids, sampling, seed=hash_text(rid) & 0xFFFF, tokenizer=builder.tokenizer,
                      _text=text)


def test_synthetic_lengths_limits_and_stops() -> None:
    builder = ReplyBuilder(SimTokenizer(), seed=1)
    responder = SyntheticResponder(builder, mean_tokens=50)
    responder.expect("a", 40)
    reply = responder.reply(view(builder, "a", SamplingParams(max_new_tokens=100)))
    assert len(reply) == 40 and reply.finish.type is FinishType.STOP
    assert reply.finish.matched == EOS_ID
    assert builder.tokenizer.encode(reply.text) == reply.token_ids  # text and ids agree

    responder.expect("b", 40)
    reply = responder.reply(view(builder, "b", SamplingParams(max_new_tokens=10)))
    assert len(reply) == 10 and reply.finish.type is FinishType.LENGTH

    responder.expect("c", 3)
    reply = responder.reply(view(builder, "c", SamplingParams(min_new_tokens=8)))
    assert len(reply) == 8
    reply = responder.reply(view(builder, "d", SamplingParams(ignore_eos=True, max_new_tokens=77)))
    assert len(reply) == 77 and reply.finish.type is FinishType.LENGTH

    responder.expect("e", 60)
    reply = responder.reply(view(builder, "e", SamplingParams(stop=["."], max_new_tokens=100)))
    assert reply.finish.type is FinishType.STOP and reply.finish.matched == "."
    assert "." not in reply.text
    assert builder.tokenizer.split(reply.text + ".")[-1] == "."  # the text stops right before

    lengths = [len(responder.reply(view(builder, f"x{i}", SamplingParams(max_new_tokens=4096))))
               for i in range(400)]
    assert 35 < sum(lengths) / len(lengths) < 65  # exponential around the mean


def test_scripted_rules_fallback_and_file() -> None:
    builder = ReplyBuilder(SimTokenizer(), seed=0)
    responder = ScriptedResponder(builder)
    responder.add(r"Action: calculator\[(\d+) \* (\d+)\]\nObservation: (\d+)\n\Z",
                  r"Thought: done.\nFinal Answer: \3")
    responder.add(r"Question: (.*)\n\Z", lambda m: f"Thought: look up {m.group(1)}.\n"
                  "Action: calculator[6 * 7]\nObservation:")
    sampling = SamplingParams(max_new_tokens=100, stop=["\nObservation:"])
    first = responder.reply(view(builder, "q", sampling, "Question: what is 6*7?\n"))
    assert first.text == "Thought: look up what is 6*7?.\nAction: calculator[6 * 7]"
    assert first.finish.matched == "\nObservation:"
    second = responder.reply(view(builder, "q2", sampling,
                                  "...Action: calculator[6 * 7]\nObservation: 42\n"))
    assert second.text == "Thought: done.\nFinal Answer: 42"
    fallback = responder.reply(view(builder, "q3", SamplingParams(max_new_tokens=5), "unmatched"))
    assert len(fallback) == 5  # synthetic pseudo-words

    from_file = ScriptedResponder.from_file(builder, FIXTURE)
    reply = from_file.reply(view(builder, "f", SamplingParams(), "The capital of France is"))
    assert reply.text == " Paris, a city on the Seine."


def test_bad_script_file_is_a_typed_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"pattern": "(unclosed", "reply": "x"}]))
    with pytest.raises(InvalidRequestError):
        ScriptedResponder.from_file(ReplyBuilder(SimTokenizer()), bad)


def test_parse_choices() -> None:
    assert parse_choices("(yes|no|maybe)") == ["yes", "no", "maybe"]
    assert parse_choices("^(?:a b|c)$") == ["a b", "c"]
    assert parse_choices(r"(3\.5|4\?)") == ["3.5", "4?"]
    for regex in (r"\d+", "[ab]", "(a|b)*", "a.c"):
        with pytest.raises(UnsupportedError):
            parse_choices(regex)


# ------------------------------------------------------------- logprobs and select


def _engine_run(body: Any, script: list[tuple[str, str]] = ()) -> Any:  # type: ignore[assignment]
    async def main() -> Any:
        engine = SimEngine(SimConfig(stream_interval=0))
        if script:
            responder = ScriptedResponder(ReplyBuilder(engine.tokenizer), fallback=engine.responder)
            for pattern, reply in script:
                responder.add(pattern, reply)
            engine.responder = responder
        async with engine:
            return await body(engine)

    return run_virtual(main())


async def _collect(engine: SimEngine, req: GenerateRequest) -> list[Chunk]:
    return [c async for c in engine.generate(req)]


def test_logprobs_shapes_and_determinism() -> None:
    async def body(engine: SimEngine) -> tuple[list[Chunk], list[Chunk]]:
        def req(rid: str, text: str) -> GenerateRequest:
            return GenerateRequest(rid=rid, text=text, return_logprob=True, logprob_start_len=0,
                                   sampling=SamplingParams(max_new_tokens=6, ignore_eos=True))

        return (await _collect(engine, req("a", "one two three four")),
                await _collect(engine, req("b", "one two three five")))

    a, b = _engine_run(body)
    final = a[-1]
    assert final.input_logprobs is not None and len(final.input_logprobs) == final.prompt_tokens
    assert final.input_logprobs[0][0] is None  # SGLang: no logprob for the first token
    assert all(-8 <= lp <= -0.5 for lp, _, _ in final.input_logprobs[1:])
    outs = [e for c in a for e in (c.output_logprobs or [])]
    assert [t for _, t, _ in outs] == [t for c in a for t in c.token_ids]
    assert all(-1.5 <= lp < 0 for lp, _, _ in outs)
    # the shared context gives the same prompt logprobs
    assert b[-1].input_logprobs[:3] == final.input_logprobs[:3]


def test_select_prefers_the_scripted_choice() -> None:
    prefix = "Q: Is the sky blue? A: "
    choices = ["no", "yes", "maybe"]

    async def body(engine: SimEngine) -> dict[str, float]:
        start = len(engine.tokenizer.encode(prefix)) - 1
        scores = {}
        for choice in choices:
            chunks = await _collect(engine, GenerateRequest(
                rid=f"sel-{choice}", text=prefix + choice, return_logprob=True,
                logprob_start_len=start, sampling=SamplingParams(max_new_tokens=0)))
            logprobs = [lp for lp, _, _ in chunks[-1].input_logprobs or [] if lp is not None]
            scores[choice] = sum(logprobs) / len(logprobs)
        constrained = await _collect(engine, GenerateRequest(
            rid="regex", text=prefix, sampling=SamplingParams(regex="(no|yes|maybe)")))
        scores["regex:" + "".join(c.text for c in constrained)] = 0.0
        return scores

    scores = _engine_run(body, script=[(r"Q: Is the sky blue\? A:\s*\Z", "yes, on a clear day.")])
    assert max(choices, key=lambda c: scores[c]) == "yes"
    assert "regex:yes" in scores

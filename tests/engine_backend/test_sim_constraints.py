"""The sim engine and constraints it cannot decode: a scripted reply that fits a regex or is
JSON passes; any other reply fails the request (never an unconstrained answer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine_backend.errors import UnsupportedError
from engine_backend.sim import SimEngine
from engine_backend.sim.config import SimConfig
from engine_backend.types import GenerateRequest, SamplingParams


@pytest.fixture
async def engine(tmp_path: Path):  # type: ignore[no-untyped-def]
    script = tmp_path / "script.json"
    script.write_text(json.dumps([
        {"pattern": r"number\?\Z", "reply": "395"},
        {"pattern": r"plan\?\Z", "reply": '[{"expression": "13 * 7"}]'},
    ]))
    sim = SimEngine(SimConfig(script_file=str(script), time_scale=0.01))
    await sim.start()
    yield sim
    await sim.close()


async def _text(engine: SimEngine, prompt: str, **sampling: object) -> str:
    request = GenerateRequest(rid=prompt, text=prompt, sampling=SamplingParams(**sampling))
    return "".join([chunk.text async for chunk in engine.generate(request)])


async def test_a_fitting_scripted_reply_passes(engine: SimEngine) -> None:
    assert await _text(engine, "A number?", regex=r"-?[0-9]+") == "395"
    plan = await _text(engine, "A plan?", json_schema='{"type": "array"}')
    assert json.loads(plan) == [{"expression": "13 * 7"}]


async def test_a_reply_that_does_not_fit_fails(engine: SimEngine) -> None:
    with pytest.raises(UnsupportedError):
        await _text(engine, "A number?", regex=r"[a-z]+")
    with pytest.raises(UnsupportedError):
        await _text(engine, "Something else", json_schema='{"type": "object"}')

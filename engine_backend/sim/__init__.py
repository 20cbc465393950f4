"""The embedded sim engine: continuous batching over a radix KV cache with a calibrated
step-cost model, in virtual or real time (see `engine.py`)."""

from engine_backend.sim.config import HardwareProfile, SimConfig
from engine_backend.sim.cost_model import StepCostModel
from engine_backend.sim.engine import SimEngine
from engine_backend.sim.responders import (
    ReplyBuilder,
    Responder,
    ScriptedResponder,
    ScriptRule,
    SyntheticResponder,
)
from engine_backend.sim.tokenizer import SimTokenizer

__all__ = [
    "HardwareProfile",
    "ReplyBuilder",
    "Responder",
    "ScriptRule",
    "ScriptedResponder",
    "SimConfig",
    "SimEngine",
    "SimTokenizer",
    "StepCostModel",
    "SyntheticResponder",
]

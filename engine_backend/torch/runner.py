"""Executes a `StepPlan` on the model: the only code that runs in the worker thread.

One forward pass over the step's flattened tokens, then sampling of the rows that need a
next token and the logprobs of the prompt tokens that asked for them.
"""

from __future__ import annotations

import torch

from .batch import StepOutput, StepPlan
from .kv_pool import KVPool
from .model import LlamaModel
from .sampling import sample_rows, token_logprobs


class ModelRunner:
    def __init__(self, model: LlamaModel, pool: KVPool) -> None:
        self.model = model
        self.pool = pool

    def run(self, plan: StepPlan) -> StepOutput:
        with torch.inference_mode():
            logits = self.model.forward(plan.batch, self.pool)
            n = len(plan.sample)  # the sampling rows come first (see StepPlan)
            tokens, logprobs = sample_rows(logits[:n], [r.sampling for r in plan.sample])
            prompt = token_logprobs(logits[n:], plan.logprob_targets) if n < len(logits) else []
        return StepOutput(tokens, logprobs, prompt)

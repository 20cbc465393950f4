"""Next-token sampling for a batch of rows, each with its own parameters.

Greedy (temperature 0 or top_k 1), or temperature with top-k and top-p (nucleus) filtering,
drawn from the row's own `torch.Generator`: a seeded request samples the same tokens
whatever else shares its batch. Logprobs are of the model's raw distribution (before
temperature and filtering), as SGLang reports them by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


class TokenMask(Protocol):
    """Constrained decoding: restricts a row's logits to the tokens a grammar allows."""

    def apply(self, logits: torch.Tensor) -> None: ...

    def accept(self, token: int) -> None: ...


@dataclass(slots=True)
class RowSampling:
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator
    banned: list[int] = field(default_factory=list)  # e.g. EOS before min_new_tokens
    mask: TokenMask | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token once the mass before it already reaches top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    return scores


def sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list[float]]:
    """One token per row of `logits [R, V]` (float32); returns tokens and their logprobs."""
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens: list[int] = []
    for i, row in enumerate(rows):
        scores = logits[i]
        if row.banned or row.mask is not None:
            scores = scores.clone()
            if row.banned:
                scores[row.banned] = float("-inf")
            if row.mask is not None:
                row.mask.apply(scores)
        if row.greedy:
            token = int(torch.argmax(scores))
        else:
            scores = _filter_top_k_top_p(scores / row.temperature, row.top_k, row.top_p)
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=row.generator))
        if row.mask is not None:
            row.mask.accept(token)
        tokens.append(token)
    picked = logprobs[torch.arange(len(rows)), torch.tensor(tokens, dtype=torch.long)]
    return tokens, picked.tolist()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """Logprob of `targets[i]` under row `i` of `logits` (prompt logprobs)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(1, targets[:, None].long())[:, 0].tolist()

"""Deterministic pseudo-logprobs for the sim engine (SGLang's `select` needs prompt logprobs).

An output token's logprob is a seeded hash of (request seed, position, token): the
engine's own samples are likely, in [-1.5, -0.02]. A prompt token's logprob depends only
on its context (the previous token, the position) and itself, so requests that share a
prefix get the same numbers, in [-8, -0.5]. Where the responder has an opinion about how a
prompt continues (a scripted rule matches), the tokens that follow that continuation get
-0.01: a `select` over choices then prefers the scripted one.
"""

from __future__ import annotations

from engine_backend.sim.responders import Reply, Responder, mix64, unit_float
from engine_backend.types import LogprobEntry

BOOSTED_LOGPROB = -0.01
# Only the tail of a prompt is checked against the responder (choices sit at the end).
PREFERENCE_WINDOW = 64


def output_logprobs(reply: Reply, seed: int, start: int, end: int) -> list[LogprobEntry]:
    ids = reply.token_ids
    return [
        (-(0.02 + 1.48 * unit_float(mix64(seed, i, ids[i]))), ids[i], reply.text_between(i, i + 1))
        for i in range(start, end)
    ]


def prompt_logprob(prev_token: int, token: int, position: int) -> float:
    return -(0.5 + 7.5 * unit_float(mix64(prev_token, token, position, 0x10961)))


def input_logprobs(
    ids: list[int], pieces: list[str], start: int, responder: Responder
) -> list[LogprobEntry]:
    """Logprobs of prompt tokens from `start` on, SGLang style: the first token of the
    prompt has no context and gets None."""
    start = max(start, 0)
    out: list[LogprobEntry] = []
    prefix = "".join(pieces[:start])
    window_start = len(ids) - PREFERENCE_WINDOW
    remainder: str | None = None  # what the responder still expects to follow
    fresh = False
    for i in range(start, len(ids)):
        piece = pieces[i]
        if i == 0:
            out.append((None, ids[0], piece))  # type: ignore[arg-type]  # SGLang sends null
            prefix += piece
            continue
        logprob = prompt_logprob(ids[i - 1], ids[i], i)
        if i >= window_start:
            if not remainder:
                remainder, fresh = responder.preferred(prefix), True
            if remainder:
                # A fresh expectation may differ from the piece in leading whitespace.
                expected = remainder.lstrip() if fresh else remainder
                core = piece.lstrip() if fresh else piece
                if core and expected.startswith(core):
                    logprob = BOOSTED_LOGPROB
                    remainder, fresh = expected[len(core) :], False
                else:
                    remainder = None
        out.append((logprob, ids[i], piece))
        prefix += piece
    return out

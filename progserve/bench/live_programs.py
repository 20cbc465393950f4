"""The programs of `progserve bench live`: the policy bench's program shapes, scaled to a
CPU engine, rendered as chat messages and run against a real engine in real time.

Scaling (documented factors, applied to the bench's `WorkloadParams` before the trace is
drawn, so the sim replays exactly the same shapes):
- `token_scale` multiplies every token count (prompts, shared segments, outputs, tool
  results). 0.25 by default: a bfcl program then sends ~10 calls of ~185 prompt and ~9
  output tokens, which SmolLM2-135M on one CPU core serves in seconds.
- `tool_scale` multiplies every tool latency (0.5 by default: bfcl's 1 s API call becomes
  0.5 s).

Text: token id `t` of a shape becomes one vocabulary word that the model's tokenizer
encodes as one token (" word", a BPE token with a leading space), so prompts have the
shapes' lengths (plus the chat template's few tokens per message) and the same prefix
sharing: shared segments are the same words for every program, fresh content is new.
Outputs are forced to the shapes' lengths (`max_tokens` with `ignore_eos`, greedy) and
sent back verbatim in the next prompt, as an agent does.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .workloads import BfclShape, ChatShape, ProgramTrace, WorkloadParams, shared_segment

LIVE_PROGRAM_TYPES = ("chat", "bfcl")  # sequential programs: one call at a time
DEFAULT_TOKEN_SCALE = 0.25
DEFAULT_TOOL_SCALE = 0.5
TOKEN_FIELDS = (
    "chat_user_tokens", "chat_reply_tokens", "chat_reply_max", "chat_system_tokens",
    "bfcl_header_tokens", "bfcl_doc_tokens", "bfcl_query_tokens", "bfcl_output_tokens",
    "bfcl_result_tokens",
)
TOOL_FIELDS = ("bfcl_tool_latency_s",)
MIN_WORDS = 64  # fewer one-token words than this: fall back to the built-in list
FALLBACK_WORDS = tuple(
    " " + w for w in (
        "the of and to in is it you that he was for on are as with his they at be this "
        "from have or by one had not but what all were when we there can an your which "
        "their said if do will each about how up out them then she many some so these "
        "would other into has more her two like him see time could no make than first "
        "been its who now people my made over did down only way find use may water long "
        "little very after words called just where most know get through back much go "
        "good new write our me man too any day same right look think also around another "
        "came come work three word must because does part even place well such here take "
        "why things help put years different away again off went old number great tell "
        "men say small every found still between name should home big give air line set "
        "own under read last never us left end along while might next sound below saw "
        "something thought both few those always looked show large often together asked "
        "house world going want school important until form food keep children feet land "
        "side without boy once animals life enough took sometimes four head above kind "
        "began almost live page got earth need far hand high year mother light parts "
        "country father let night following picture being study second eyes soon times "
        "story boys since white days ever paper hard near sentence better best across "
        "during today others however sure means knew its try told young miles sun ways "
        "thing whole hear example heard several change answer room sea against top turned "
        "learn point city play toward five using himself usually").split()
)


def scaled_params(token_scale: float, tool_scale: float) -> WorkloadParams:
    """The bench's workload parameters with every token count and tool latency scaled."""
    base = WorkloadParams()
    update: dict[str, Any] = {}
    for name in TOKEN_FIELDS:
        value = getattr(base, name)
        scaled = max(1.0, value * token_scale)
        update[name] = round(scaled) if isinstance(value, int) else scaled
    for name in TOOL_FIELDS:
        update[name] = getattr(base, name) * tool_scale
    return dataclasses.replace(base, **update)


def one_token_words(tokenizer_dir: str | Path | None) -> tuple[str, ...]:
    """Words (with their leading space) that `tokenizer_dir`'s tokenizer encodes as one
    token each; the built-in list when there is no tokenizer or too few such words."""
    if tokenizer_dir is None:
        return FALLBACK_WORDS
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    words = []
    for piece in sorted(tok.get_vocab()):
        if piece.startswith("Ġ") and piece[1:].isalpha() and piece[1:].islower() \
                and 3 <= len(piece) - 1 <= 9:
            text = " " + piece[1:]
            if len(tok.encode(text, add_special_tokens=False)) == 1:
                words.append(text)
    return tuple(words) if len(words) >= MIN_WORDS else FALLBACK_WORDS


class TextRenderer:
    """Token ids of a shape -> words (a fixed, well-spread map from ids to the words)."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(words)

    def text(self, ids: Sequence[int] | range) -> str:
        n = len(self.words)
        return "".join(self.words[(i * 2_654_435_761 >> 7) % n] for i in ids)


@dataclass(slots=True)
class CallRecord:
    """One LLM call as its client saw it."""

    start: float
    ttft: float | None
    end: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    token_times: list[float] = field(default_factory=list)  # only when a caller tracks them


@dataclass(slots=True)
class ProgramRecord:
    index: int
    kind: str
    arrival: float
    finish: float = 0.0
    tokens: int = 0
    calls: list[CallRecord] = field(default_factory=list)

    @property
    def token_latency(self) -> float:
        return (self.finish - self.arrival) / max(self.tokens, 1)


# (program id, call index, messages, output tokens, last call of the program)
#   -> (what the call did, its text)
Caller = Callable[[str, int, list[dict[str, str]], int, bool],
                  Awaitable[tuple[CallRecord, str]]]


class LivePrograms:
    """Runs one program of the trace as chat messages through a `Caller`."""

    def __init__(self, params: WorkloadParams, words: Sequence[str]) -> None:
        self.params = params
        self.render = TextRenderer(words)
        p = params
        self.chat_system = self.render.text(shared_segment("chat-system", 0,
                                                           p.chat_system_tokens))
        header = self.render.text(shared_segment("bfcl-header", 0, p.bfcl_header_tokens))
        # The doc sets' lengths as in driver.Client (the sim's prompts).
        self.bfcl_systems = [
            header + self.render.text(shared_segment(
                "bfcl-docs", i, max(1, round(p.bfcl_doc_tokens * (0.6 + 0.8 * (i % 5) / 4)))))
            for i in range(p.bfcl_doc_sets)
        ]

    async def run(self, program: ProgramTrace, call: Caller, record: ProgramRecord) -> None:
        shape = program.shape
        if isinstance(shape, ChatShape):
            await self._chat(program, shape, call, record)
        elif isinstance(shape, BfclShape):
            await self._bfcl(program, shape, call, record)
        else:
            raise ValueError(f"bench live runs {', '.join(LIVE_PROGRAM_TYPES)} programs, "
                             f"not {program.kind}")

    def _fresh(self, program: ProgramTrace) -> Callable[[int], str]:
        cursor = [program.token_base]

        def take(n: int) -> str:
            start = cursor[0]
            cursor[0] += n
            return self.render.text(range(start, start + n))

        return take

    async def _chat(self, program: ProgramTrace, shape: ChatShape, call: Caller,
                    record: ProgramRecord) -> None:
        fresh = self._fresh(program)
        messages = [{"role": "system", "content": self.chat_system}]
        for turn, (user, reply) in enumerate(shape.turns):
            messages.append({"role": "user", "content": fresh(user)})
            out = await self._call(program, turn, messages, reply, call, record,
                                   last=turn == len(shape.turns) - 1)
            messages.append({"role": "assistant", "content": out})

    async def _bfcl(self, program: ProgramTrace, shape: BfclShape, call: Caller,
                    record: ProgramRecord) -> None:
        fresh = self._fresh(program)
        messages = [{"role": "system", "content": self.bfcl_systems[shape.doc_set]},
                    {"role": "user", "content": fresh(shape.query_tokens)}]
        last = len(shape.steps) - 1
        for step, (out_tokens, latency, result_tokens) in enumerate(shape.steps):
            out = await self._call(program, step, messages, out_tokens, call, record,
                                   last=step == last)
            messages.append({"role": "assistant", "content": out})
            if step < last:
                await asyncio.sleep(latency)  # the tool runs on the client side
                messages.append({"role": "user", "content": fresh(result_tokens)})

    async def _call(self, program: ProgramTrace, index: int, messages: list[dict[str, str]],
                    out_tokens: int, call: Caller, record: ProgramRecord, *, last: bool) -> str:
        result, text = await call(program.id, index, list(messages), out_tokens, last)
        record.calls.append(result)
        record.tokens += result.completion_tokens
        return text  # sent back verbatim, as an agent does

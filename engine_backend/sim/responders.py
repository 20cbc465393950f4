"""Responders: what the simulated model says. The engine asks once per request, when the
request is first admitted; how long the reply takes is the engine's business.

- `SyntheticResponder`: deterministic pseudo-words. The length is the one registered for
  the request (`expect(rid, n)`, filled by a benchmark from its trace) or else drawn
  from a seeded exponential distribution.
- `ScriptedResponder`: rules mapping prompt patterns to replies (examples, tests: a
  ReAct turn, an LLMCompiler plan, a summary), with the synthetic responder as fallback.

Both honour `max_new_tokens` (finish "length"), stop strings and stop token ids (finish
"stop" with the match), `min_new_tokens` and `ignore_eos`. Replies are deterministic for
the engine seed and the request: its sampling seed, else its prompt when greedy
(temperature 0), else its rid.
"""

from __future__ import annotations

import abc
import json
import math
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine_backend.errors import InvalidRequestError, UnsupportedError
from engine_backend.radix_cache import TOKEN_BYTES, KeyedTokens, TokenKey
from engine_backend.sim.tokenizer import EOS_ID, SimTokenizer, pseudo_word
from engine_backend.types import FinishReason, FinishType, SamplingParams

_MASK64 = (1 << 64) - 1
POOL_TOKENS = 1 << 12  # synthetic replies are cut from (and longer ones repeat) this pool
END_OF_TURN = FinishReason(FinishType.STOP, matched=EOS_ID)  # immutable, shared


def mix64(*values: int) -> int:
    """SplitMix64 over a few integers: a fast, well-spread, process-stable hash."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h


def unit_float(h: int) -> float:
    """A 64-bit hash as a float in [0, 1)."""
    return (h >> 11) * (1.0 / (1 << 53))


@dataclass(slots=True)
class PromptView:
    """What a responder may look at. `text` is decoded lazily for token-id prompts."""

    rid: str
    ids: list[int]
    sampling: SamplingParams
    seed: int
    tokenizer: SimTokenizer
    _text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.tokenizer.decode(self.ids)
        return self._text


@dataclass(slots=True)
class Reply:
    """A reply: tokens plus their text, stored as offsets into `source` (pool replies share
    one string, so building a reply copies no text). Token i covers
    `source[start(i):ends[i]]`; everything is clipped at `text_end` (a trimmed stop string)."""

    token_ids: list[int]
    source: str
    base: int  # offset of token 0 in `source`
    ends: list[int]
    text_end: int
    finish: FinishReason

    def __len__(self) -> int:
        return len(self.token_ids)

    def text_between(self, a: int, b: int) -> str:
        """Text of tokens [a, b)."""
        if b <= a:
            return ""
        start = self.ends[a - 1] if a else self.base
        end = self.ends[b - 1]
        limit = self.text_end
        return self.source[min(start, limit) : min(end, limit)]

    @property
    def text(self) -> str:
        return self.text_between(0, len(self.token_ids))


class ReplyBuilder:
    """Turns a reply text or a synthetic length into a `Reply` that obeys the sampling
    params. Owns the pool of pseudo-words that synthetic replies are cut from."""

    def __init__(self, tokenizer: SimTokenizer, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        rng = random.Random(mix64(seed, 0x5EED))
        words: list[str] = []
        for i in range(POOL_TOKENS):
            word = pseudo_word(rng.randrange(1, 1 << 20))
            words.append(word + "." if i % 13 == 12 else word)
        text = "".join(words)
        self.pool_ids, pieces = tokenizer.encode_pieces(text)
        # Encoded once for the radix trees: a reply's key is a slice of it.
        self.pool_key = TokenKey(self.pool_ids)
        self.pool_text = text
        ends, pos = [], 0
        for piece in pieces:
            pos += len(piece)
            ends.append(pos)
        self.pool_ends = ends

    def synthetic(self, n_tokens: int, seed: int, sampling: SamplingParams) -> Reply:
        n = self._natural_length(n_tokens, sampling)
        size = len(self.pool_ids)
        if n <= size:
            start = mix64(seed, 0xC0FFEE) % (size - n + 1)
            key = self.pool_key.data[start * TOKEN_BYTES : (start + n) * TOKEN_BYTES]
            reply = Reply(
                token_ids=KeyedTokens.with_key(self.pool_ids[start : start + n],
                                               TokenKey.from_bytes(key)),
                source=self.pool_text,
                base=self.pool_ends[start - 1] if start else 0,
                ends=self.pool_ends[start : start + n],
                text_end=self.pool_ends[start + n - 1] if n else 0,
                finish=END_OF_TURN,
            )
        else:  # longer than the pool: repeat it
            reps = -(-n // size)
            ids = (self.pool_ids * reps)[:n]
            text_len = self.pool_ends[-1]
            ends = [e + r * text_len for r in range(reps) for e in self.pool_ends][:n]
            reply = Reply(ids, self.pool_text * reps, 0, ends, ends[-1],
                          END_OF_TURN)
        return self._apply_stops(reply, sampling)

    def from_text(self, text: str, seed: int, sampling: SamplingParams) -> Reply:
        ids, pieces = self.tokenizer.encode_pieces(text)
        natural = self._natural_length(len(ids), sampling)
        if natural > len(ids):  # min_new_tokens / ignore_eos: keep talking
            pad = self.synthetic(natural - len(ids), seed, SamplingParams(ignore_eos=True,
                                 max_new_tokens=natural - len(ids)))
            text += pad.text
            ids, pieces = self.tokenizer.encode_pieces(text)
        ends, pos = [], 0
        for piece in pieces:
            pos += len(piece)
            ends.append(pos)
        reply = Reply(ids, text, 0, ends, len(text), END_OF_TURN)
        return self._apply_stops(reply, sampling)

    @staticmethod
    def _natural_length(n_tokens: int, sampling: SamplingParams) -> int:
        if sampling.ignore_eos:
            return sampling.max_new_tokens
        # `min_new_tokens` lengthens a reply only up to `max_new_tokens`: the engine may
        # have lowered that (context, KV) below the minimum, and a reply is never built
        # longer than what can be sent.
        return max(n_tokens, min(sampling.min_new_tokens, sampling.max_new_tokens))

    @staticmethod
    def _apply_stops(reply: Reply, sampling: SamplingParams) -> Reply:
        """Cut at max_new_tokens, then at the earliest stop token id or stop string."""
        limit = sampling.max_new_tokens
        if len(reply.token_ids) >= limit:  # its end-of-turn token would be one more
            _truncate(reply, limit, FinishReason(FinishType.LENGTH, length=limit))
        if sampling.stop_token_ids and reply.token_ids:
            stop_ids = set(sampling.stop_token_ids)
            for i, token in enumerate(reply.token_ids):
                if token in stop_ids and i + 1 >= sampling.min_new_tokens:
                    _truncate(reply, i + 1, FinishReason(FinishType.STOP, matched=token))
                    break
        if sampling.stop and reply.token_ids:
            _cut_at_stop_string(reply, sampling)
        return reply


def _truncate(reply: Reply, n: int, finish: FinishReason) -> None:
    del reply.token_ids[n:]
    del reply.ends[n:]
    reply.text_end = min(reply.text_end, reply.ends[-1] if n else reply.base)
    reply.finish = finish


def _cut_at_stop_string(reply: Reply, sampling: SamplingParams) -> None:
    # Stop strings match in the generated text after `min_new_tokens` tokens; the token
    # that completes the match is the last one, and the text ends before the match.
    text_start = reply.base
    # A reply shorter than `min_new_tokens` (cut at `max_new_tokens`) allows no stop.
    at_least = min(sampling.min_new_tokens, len(reply.ends))
    first_allowed = reply.ends[at_least - 1] if at_least else text_start
    best: tuple[int, str] | None = None
    for stop in sampling.stop:
        if not stop:
            continue
        at = reply.source.find(stop, text_start, reply.text_end)
        while at != -1 and at + len(stop) <= first_allowed:
            at = reply.source.find(stop, at + 1, reply.text_end)
        if at != -1 and (best is None or at < best[0]):
            best = (at, stop)
    if best is None:
        return
    at, stop = best
    match_end = at + len(stop)
    last = next(i for i, end in enumerate(reply.ends) if end >= match_end)
    _truncate(reply, last + 1, FinishReason(FinishType.STOP, matched=stop))
    reply.text_end = at


def request_seed(engine_seed: int, rid: str, prompt: bytes, sampling: SamplingParams) -> int:
    """Same sampling seed and prompt, or a greedy request's prompt, give the same reply;
    otherwise the rid decides. `prompt` is the prompt's token bytes (its `TokenKey`)."""
    if sampling.seed is not None:
        return mix64(engine_seed, sampling.seed, zlib.crc32(prompt), len(prompt))
    if sampling.temperature == 0.0:
        return mix64(engine_seed, zlib.crc32(prompt), len(prompt))
    return mix64(engine_seed, hash_text(rid))


def hash_text(text: str) -> int:
    """A process-stable string hash (`hash(str)` is salted per process)."""
    return zlib.crc32(text.encode("utf-8")) | (len(text) << 32)


_LITERAL_ALT = re.compile(r"(?:\\.|[^\\.^$*+?()\[\]{}|])*")


def parse_choices(regex: str) -> list[str]:
    """The alternatives of a `choices`-like regex such as `(yes|no|maybe)`. Anything else
    raises `UnsupportedError`: the sim engine only does this kind of constrained decoding."""
    body = regex
    if body.startswith("^"):
        body = body[1:]
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    for opener in ("(?:", "("):
        if body.startswith(opener) and body.endswith(")"):
            body = body[len(opener) : -1]
            break
    alternatives = body.split("|")
    if not all(_LITERAL_ALT.fullmatch(alt) for alt in alternatives) or "\\|" in body:
        raise UnsupportedError(
            f"the sim engine supports only regexes that list literal choices, got {regex!r}"
        )
    choices = [re.sub(r"\\(.)", r"\1", alt) for alt in alternatives]
    if not any(choices):
        raise UnsupportedError(f"regex {regex!r} allows only the empty string")
    return choices


class Responder(abc.ABC):
    """Decides each request's reply. Subclasses implement `reply`; `preferred` lets
    prompt logprobs favour the continuation the responder would produce."""

    def __init__(self, builder: ReplyBuilder) -> None:
        self.builder = builder

    @abc.abstractmethod
    def reply(self, prompt: PromptView) -> Reply: ...

    def preferred(self, prompt_text: str) -> str | None:
        """The text this responder would continue `prompt_text` with, if it has an opinion."""
        return None

    def choose(self, prompt: PromptView, choices: list[str]) -> Reply:
        """Constrained decoding over literal choices: the preferred one, else a seeded pick."""
        wanted = self.preferred(prompt.text)
        pick = None
        if wanted is not None:
            stripped = wanted.strip()
            pick = next((c for c in choices if c == wanted or c.strip() == stripped), None)
            if pick is None:
                pick = next((c for c in choices if c and stripped.startswith(c.strip())), None)
        if pick is None:
            pick = choices[mix64(prompt.seed, 0xC401CE) % len(choices)]
        sampling = prompt.sampling.model_copy(update={"stop": [], "min_new_tokens": 0,
                                                      "ignore_eos": False})
        return self.builder.from_text(pick, prompt.seed, sampling)


class SyntheticResponder(Responder):
    """Pseudo-word replies whose lengths come from a registry or a seeded distribution."""

    def __init__(self, builder: ReplyBuilder, mean_tokens: int = 128) -> None:
        super().__init__(builder)
        self.mean_tokens = mean_tokens
        self._expected: dict[str, int] = {}

    def expect(self, rid: str, n_tokens: int) -> None:
        """Register the natural output length of request `rid` (consumed by its admission)."""
        if n_tokens < 0:
            raise InvalidRequestError(f"expected output length must be >= 0, got {n_tokens}")
        self._expected[rid] = n_tokens

    def forget(self, rid: str) -> None:
        self._expected.pop(rid, None)

    def length_for(self, prompt: PromptView) -> int:
        n = self._expected.pop(prompt.rid, None)
        if n is not None:
            return n
        u = unit_float(mix64(prompt.seed, 0x1E96))
        return 1 + int(-(self.mean_tokens - 1) * math.log1p(-u))

    def reply(self, prompt: PromptView) -> Reply:
        return self.builder.synthetic(self.length_for(prompt), prompt.seed, prompt.sampling)


ReplyFn = Callable[[re.Match[str]], str]


@dataclass(slots=True, frozen=True)
class ScriptRule:
    """When `pattern` is found in the prompt text, reply with `reply`: a template
    (`\\1`, `\\g<name>` expand the match) or a function of the match."""

    pattern: re.Pattern[str]
    reply: str | ReplyFn

    @classmethod
    def of(cls, pattern: str | re.Pattern[str], reply: str | ReplyFn) -> ScriptRule:
        compiled = re.compile(pattern, re.DOTALL) if isinstance(pattern, str) else pattern
        return cls(compiled, reply)

    def respond(self, text: str) -> str | None:
        match = self.pattern.search(text)
        if match is None:
            return None
        return self.reply(match) if callable(self.reply) else match.expand(self.reply)


class ScriptedResponder(Responder):
    """The first rule whose pattern matches the prompt decides the reply; no rule: synthetic.

    Patterns search the whole prompt; anchor with `\\Z` to react to its end (the last
    turn of an agent's context)."""

    def __init__(
        self,
        builder: ReplyBuilder,
        rules: Sequence[ScriptRule] = (),
        fallback: Responder | None = None,
    ) -> None:
        super().__init__(builder)
        self.rules = list(rules)
        self.fallback = fallback or SyntheticResponder(builder)

    @classmethod
    def from_file(cls, builder: ReplyBuilder, path: Path,
                  fallback: Responder | None = None) -> ScriptedResponder:
        """Rules from a JSON list of `{"pattern": ..., "reply": ...}` objects."""
        try:
            items = json.loads(Path(path).read_text())
            rules = [ScriptRule.of(item["pattern"], item["reply"]) for item in items]
        except (OSError, ValueError, KeyError, TypeError, re.error) as exc:
            raise InvalidRequestError(f"bad script file {path}: {exc}") from exc
        return cls(builder, rules, fallback)

    def add(self, pattern: str | re.Pattern[str], reply: str | ReplyFn) -> None:
        self.rules.append(ScriptRule.of(pattern, reply))

    def preferred(self, prompt_text: str) -> str | None:
        for rule in self.rules:
            text = rule.respond(prompt_text)
            if text is not None:
                return text
        return self.fallback.preferred(prompt_text)

    def reply(self, prompt: PromptView) -> Reply:
        text = self.preferred(prompt.text) if self.rules else None
        if text is None:
            return self.fallback.reply(prompt)
        return self.builder.from_text(text, prompt.seed, prompt.sampling)

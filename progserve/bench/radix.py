"""Radix cache micro-benchmark: match+insert ops/s on a synthetic agent trace.

One op is what an engine does per request: `match_prefix(prompt)` at admission, then
`insert(prompt + output, slots)` at finish, then evict down to the capacity. The trace is
deterministic for a seed: a few shared system prompts (1-2k tokens), programs whose
contexts grow turn by turn (output, then a tool result or user message appended), forks
of a context into branches, and some fresh unrelated requests.

Every cache gets every request in turn (interleaved, so a busy machine slows all alike),
and only the CPU time of the cache calls is counted. With `--compare-sglang`, SGLang's own
RadixCache and its Rust-core UnifiedRadixCache run in the same loop when `sglang` imports.
"""

from __future__ import annotations

import argparse
import array
import importlib.util
import json
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Protocol

from engine_backend.radix_cache import RadixCache, TokenKey

TOKEN_TYPE = "H"  # 16-bit token ids, generated in bulk from random bytes


@dataclass(slots=True)
class TraceConfig:
    ops: int = 10_000
    seed: int = 0
    system_prompts: int = 4
    system_prompt_tokens: tuple[int, int] = (1000, 2000)
    active_programs: int = 48
    turns: tuple[int, int] = (3, 15)
    user_tokens: tuple[int, int] = (50, 300)
    output_tokens: tuple[int, int] = (20, 300)
    tool_result_tokens: tuple[int, int] = (20, 400)
    fork_prob: float = 0.08
    fork_branches: tuple[int, int] = (2, 4)
    fresh_prob: float = 0.1
    fresh_tokens: tuple[int, int] = (100, 1000)
    max_context_tokens: int = 12_000


@dataclass(slots=True)
class Request:
    program: str
    prompt: list[int]
    output: list[int]


@dataclass(slots=True)
class _Program:
    pid: str
    context: array.array  # token ids so far
    turns_left: int


class AgentTrace:
    """Deterministic request stream of interleaved agent programs.

    Every request's token lists are fresh int objects (`array.tolist()`), as a tokenizer
    would hand them over, so list comparisons cannot short-cut on object identity."""

    def __init__(self, config: TraceConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self._next_pid = 0
        self.system_prompts = [
            self._tokens(config.system_prompt_tokens) for _ in range(config.system_prompts)
        ]
        self.programs = [self._new_program() for _ in range(config.active_programs)]

    def __iter__(self) -> Iterator[Request]:
        for _ in range(self.config.ops):
            if self.rng.random() < self.config.fresh_prob:
                yield self._fresh_request()
            else:
                yield self._program_turn()

    def _tokens(self, bounds: tuple[int, int]) -> array.array:
        tokens = array.array(TOKEN_TYPE)
        tokens.frombytes(self.rng.randbytes(self.rng.randint(*bounds) * tokens.itemsize))
        return tokens

    def _new_program(self, context: array.array | None = None) -> _Program:
        self._next_pid += 1
        if context is None:
            system_prompt = self.rng.choice(self.system_prompts)
            context = system_prompt + self._tokens(self.config.user_tokens)
        return _Program(f"p{self._next_pid}", context, self.rng.randint(*self.config.turns))

    def _fresh_request(self) -> Request:
        prompt = self._tokens(self.config.fresh_tokens).tolist()
        return Request("fresh", prompt, self._tokens(self.config.output_tokens).tolist())

    def _program_turn(self) -> Request:
        index = self.rng.randrange(len(self.programs))
        program = self.programs[index]
        output = self._tokens(self.config.output_tokens)
        request = Request(program.pid, program.context.tolist(), output.tolist())
        tool_result = self._tokens(self.config.tool_result_tokens)
        program.context = program.context + output + tool_result
        program.turns_left -= 1
        if program.turns_left <= 0 or len(program.context) > self.config.max_context_tokens:
            self.programs[index] = self._new_program()
        elif self.rng.random() < self.config.fork_prob:
            self._fork(program)
        return request

    def _fork(self, program: _Program) -> None:
        # Branches share the context so far and diverge from their next tokens on.
        for _ in range(self.rng.randint(*self.config.fork_branches) - 1):
            user = self._tokens(self.config.user_tokens)
            branch = self._new_program(program.context + user)
            self.programs[self.rng.randrange(len(self.programs))] = branch


# ----------------------------------------------------------------------- sides


@dataclass(slots=True)
class RunResult:
    name: str
    ops: int = 0
    seconds: float = 0.0  # CPU time of the timed calls
    prompt_tokens: int = 0
    matched_tokens: int = 0
    evicted_tokens: int = 0
    tree_tokens: int = 0

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def hit_rate(self) -> float:
        return self.matched_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def to_json(self) -> dict[str, float | int | str]:
        return {**asdict(self), "ops_per_s": round(self.ops_per_s, 1),
                "us_per_op": round(1e6 / self.ops_per_s, 2) if self.ops else 0.0,
                "hit_rate": round(self.hit_rate, 4)}


class Side(Protocol):
    """One cache under test. `prepare` is untimed (slot values); `op` is timed: what an
    engine does per request (match the prompt, insert prompt + output, evict to capacity)."""

    result: RunResult

    def prepare(self, request: Request) -> object: ...

    def op(self, request: Request, prepared: object) -> tuple[int, int]:
        """Returns (matched tokens, evicted tokens)."""
        ...

    def size(self) -> int: ...


class ProgserveSide:
    """progserve's RadixCache. `encode_once`: the engine's way, one `TokenKey` per request
    (encoded at admission, extended by the output at finish); else plain token lists."""

    def __init__(self, *, capacity: int, eviction: str, encode_once: bool,
                 encode_untimed: bool = False, values: bool = True) -> None:
        self.capacity = capacity
        self.encode_once = encode_once
        self.encode_untimed = encode_untimed and encode_once
        self.values = values
        self.pin_waiting = eviction == "priority"
        self.freed: list[int] = []
        self.cache = RadixCache(eviction=eviction, store_values=values,
                                on_evict=self.freed.extend)
        self.next_slot = 0
        keys = "TokenKey" if encode_once else "lists"
        kind = "" if values else ", no values"
        self.result = RunResult(name=f"progserve RadixCache ({eviction}, {keys}{kind})")

    def prepare(self, request: Request) -> tuple[list[int] | None, TokenKey | None,
                                                   TokenKey | None]:
        start = self.next_slot
        self.next_slot += len(request.prompt) + len(request.output)
        self.freed.clear()
        values = list(range(start, self.next_slot)) if self.values else None
        if not self.encode_untimed:
            return values, None, None
        prompt = TokenKey(request.prompt)
        return values, prompt, prompt.extended(request.output)

    def op(self, request: Request, prepared: object) -> tuple[int, int]:
        cache, owner = self.cache, request.program
        values, prompt, full = prepared  # type: ignore[misc]
        if self.pin_waiting:
            cache.unpin(owner)  # the program is back from its tool
        if prompt is not None:
            matched = cache.match_prefix(prompt).length
            cache.insert(full, values, owner=owner)
        elif self.encode_once:
            key = TokenKey(request.prompt)
            matched = cache.match_prefix(key).length
            cache.insert(key.extended(request.output), values, owner=owner)
        else:
            matched = cache.match_prefix(request.prompt).length
            cache.insert(request.prompt + request.output, values, owner=owner)
        if self.pin_waiting:
            cache.pin(owner)  # ... and waits on the next one
        overflow = cache.total_size() - self.capacity
        return matched, cache.evict(overflow) if overflow > 0 else 0

    def size(self) -> int:
        return self.cache.total_size()


def sglang_unavailable_reason() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed"
    try:
        from sglang.srt.mem_cache import base_prefix_cache, radix_cache  # noqa: F401
    except Exception as exc:  # its server internals need torch and much more
        return f"sglang's RadixCache does not import here: {type(exc).__name__}: {exc}"
    return None


class _SimAllocator:
    """What SGLang's caches call on their KV allocator; the bench tracks no memory."""

    page_size = 1

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")

    def free(self, indices: object) -> None:
        pass

    def free_segment(self, indices: object, start_pos: int = 0) -> None:
        pass


class SGLangSide:
    """SGLang's own cache: `RadixCache` (Python) or `UnifiedRadixCache` on its Rust tree
    core (`unified=True`). Keys are `array("q")`, SGLang's token-id container, built inside
    the timed region as our keys are. SGLang's match returns only the length (no values)."""

    def __init__(self, *, capacity: int, unified: bool, encode_untimed: bool = False) -> None:
        import torch
        from sglang.srt.mem_cache import base_prefix_cache as base
        from sglang.srt.mem_cache.radix_cache import RadixKey

        self.torch, self.base, self.radix_key = torch, base, RadixKey
        self.capacity = capacity
        self.encode_untimed = encode_untimed
        self.cache = self._unified_cache() if unified else self._python_cache()
        self.next_slot = 0
        label = "UnifiedRadixCache, Rust core" if unified else "RadixCache"
        self.result = RunResult(name=f"SGLang {label} (lru)")

    @staticmethod
    def _python_cache():  # noqa: ANN205 - SGLang's object
        from sglang.srt.mem_cache.radix_cache import RadixCache as SGLangRadixCache

        return SGLangRadixCache.create_simulated(mock_allocator=_SimAllocator())

    @staticmethod
    def _unified_cache():  # noqa: ANN205 - SGLang's object
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.unified_cache.component_type import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

        return UnifiedRadixCache(CacheInitParams(
            disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=_SimAllocator(),
            page_size=1, tree_components=(ComponentType.FULL,), tree_core_backend="rust"))

    def prepare(self, request: Request) -> tuple[object, array.array | None, array.array | None]:
        start = self.next_slot
        self.next_slot += len(request.prompt) + len(request.output)
        values = self.torch.arange(start, self.next_slot, dtype=self.torch.int64)
        if not self.encode_untimed:
            return values, None, None
        prompt = array.array("q", request.prompt)
        return values, prompt, prompt + array.array("q", request.output)

    def op(self, request: Request, prepared: object) -> tuple[int, int]:
        cache, base, radix_key = self.cache, self.base, self.radix_key
        values, prompt, full = prepared  # type: ignore[misc]
        if prompt is None:
            prompt = array.array("q", request.prompt)
        found = cache.match_prefix(base.MatchPrefixParams(key=radix_key(prompt)))
        if full is None:
            full = prompt + array.array("q", request.output)
        cache.insert(base.InsertParams(key=radix_key(full), value=values))
        overflow = self.size() - self.capacity
        if overflow <= 0:
            return found.device_prefix_len, 0
        evicted = cache.evict(base.EvictParams(num_tokens=overflow)).num_tokens_evicted
        return found.device_prefix_len, evicted

    def size(self) -> int:
        return self.cache.evictable_size() + self.cache.protected_size()


def run_sides(trace: Iterable[Request], sides: list[Side],
              on_step: Callable[[], None] | None = None) -> list[RunResult]:
    """Feeds every request to every side in turn (rotating who goes first), so load
    changes on a shared machine hit all sides alike. Times CPU time of `op` only."""
    clock = time.thread_time
    for index, request in enumerate(trace):
        for turn in range(len(sides)):
            side = sides[(index + turn) % len(sides)]
            prepared = side.prepare(request)
            start = clock()
            matched, evicted = side.op(request, prepared)
            elapsed = clock() - start
            result = side.result
            result.seconds += elapsed
            result.ops += 1
            result.prompt_tokens += len(request.prompt)
            result.matched_tokens += matched
            result.evicted_tokens += evicted
        if on_step is not None:
            on_step()
    for side in sides:
        side.result.tree_tokens = side.size()
    return [side.result for side in sides]


# -------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = TraceConfig()
    parser.add_argument("--ops", type=int, default=defaults.ops,
                        help="requests (match+insert pairs) per side (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--capacity", type=int, default=200_000,
                        help="cache capacity in tokens; evictions keep it below (default %(default)s)")
    parser.add_argument("--eviction", choices=["lru", "priority"], default="lru",
                        help="our eviction order; priority pins each program between its turns")
    parser.add_argument("--compare-sglang", action="store_true",
                        help="also run SGLang's caches on the same requests, if importable")
    parser.add_argument("--no-values", action="store_true",
                        help="our caches store no per-token values (the sim engine's mode; "
                             "SGLang's match returns no values either)")
    parser.add_argument("--encode-untimed", action="store_true",
                        help="build encoded keys (TokenKey, SGLang's array) outside the timed "
                             "region: times the tree alone")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")


def main(args: argparse.Namespace) -> int:
    config = TraceConfig(ops=args.ops, seed=args.seed)
    untimed, values = args.encode_untimed, not args.no_values
    sides: list[Side] = [
        ProgserveSide(capacity=args.capacity, eviction=args.eviction, encode_once=True,
                      encode_untimed=untimed, values=values),
        ProgserveSide(capacity=args.capacity, eviction=args.eviction, encode_once=False,
                      values=values),
    ]
    sglang_note = sglang_unavailable_reason() if args.compare_sglang else None
    if args.compare_sglang and sglang_note is None:
        sides.append(SGLangSide(capacity=args.capacity, unified=False, encode_untimed=untimed))
        try:
            sides.append(SGLangSide(capacity=args.capacity, unified=True,
                                    encode_untimed=untimed))
        except Exception as exc:  # a build without the Rust tree core
            sglang_note = f"UnifiedRadixCache unavailable: {type(exc).__name__}: {exc}"
    results = _run_with_progress(config, sides)
    _print_report(config, args.capacity, results, sglang_note, untimed)
    if args.json:
        payload = {"bench": "radix", "trace": asdict(config), "capacity": args.capacity,
                   "eviction": args.eviction, "timer": "thread CPU time",
                   "encode_untimed": untimed, "values": values,
                   "results": [r.to_json() for r in results], "sglang_note": sglang_note}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=2)
    return 0


def _run_with_progress(config: TraceConfig, sides: list[Side]) -> list[RunResult]:
    from rich.progress import Progress

    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("radix bench", total=config.ops)
        return run_sides(AgentTrace(config), sides, on_step=lambda: progress.advance(task))


def _print_report(config: TraceConfig, capacity: int, results: list[RunResult],
                  sglang_note: str | None, encode_untimed: bool) -> None:
    keys = " (keys encoded outside the timed region)" if encode_untimed else ""
    print(f"radix bench: {config.ops} requests (match+insert ops) per cache, seed "
          f"{config.seed}, capacity {capacity} tokens; CPU time of the cache calls{keys}")
    for r in results:
        print(f"  {r.name:44s} {r.ops_per_s:9,.0f} ops/s ({r.to_json()['us_per_op']} us/op)"
              f"  hit rate {r.hit_rate:.1%}  tree {r.tree_tokens} tokens"
              f"  evicted {r.evicted_tokens}")
    ours = [r for r in results if not r.name.startswith("SGLang")]
    for theirs in (r for r in results if r.name.startswith("SGLang") and r.ops_per_s):
        for r in ours:
            print(f"  {r.name} / {theirs.name}: {r.ops_per_s / theirs.ops_per_s:.2f}x")
    if sglang_note:
        print(f"  SGLang comparison incomplete: {sglang_note}")


if __name__ == "__main__":  # `python -m progserve.bench.radix`, e.g. inside an SGLang venv
    _parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    configure(_parser)
    sys.exit(main(_parser.parse_args()))

"""Radix cache micro-benchmark: match+insert ops/s on a synthetic agent trace.

One op is what an engine does per request: `match_prefix(prompt)` at admission, then
`insert(prompt + output, slots)` at finish, then evict down to the capacity. The trace is
deterministic for a seed: a few shared system prompts (1-2k tokens), programs whose
contexts grow turn by turn (output, then a tool result or user message appended), forks
of a context into branches, and some fresh unrelated requests. Every prompt is built
from fresh int objects, as a tokenizer would hand them over, so list comparisons cannot
short-cut on object identity. Only the cache calls are timed.

With `--compare-sglang`, SGLang's own RadixCache runs the same trace in the same run
when `sglang` is importable.
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
from dataclasses import asdict, dataclass, field

from engine_backend.radix_cache import RadixCache, TokenKey

VOCAB = 128_000


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
    context: list[int]
    turns_left: int


class AgentTrace:
    """Deterministic request stream of interleaved agent programs."""

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

    def _tokens(self, bounds: tuple[int, int]) -> list[int]:
        n = self.rng.randint(*bounds)
        return [self.rng.randrange(VOCAB) for _ in range(n)]

    def _new_program(self, context: list[int] | None = None) -> _Program:
        self._next_pid += 1
        if context is None:
            context = self.rng.choice(self.system_prompts) + self._tokens(self.config.user_tokens)
        return _Program(f"p{self._next_pid}", context, self.rng.randint(*self.config.turns))

    def _fresh_request(self) -> Request:
        prompt = self._tokens(self.config.fresh_tokens)
        return Request("fresh", prompt, self._tokens(self.config.output_tokens))

    def _program_turn(self) -> Request:
        index = self.rng.randrange(len(self.programs))
        program = self.programs[index]
        request = Request(program.pid, _fresh_ints(program.context),
                          self._tokens(self.config.output_tokens))
        program.context = program.context + request.output + self._tokens(
            self.config.tool_result_tokens
        )
        program.turns_left -= 1
        if program.turns_left <= 0 or len(program.context) > self.config.max_context_tokens:
            self.programs[index] = self._new_program()
        elif self.rng.random() < self.config.fork_prob:
            self._fork(program)
        return request

    def _fork(self, program: _Program) -> None:
        # Branches share the context so far and diverge from their next tokens on.
        for _ in range(self.rng.randint(*self.config.fork_branches) - 1):
            branch = self._new_program(program.context + self._tokens(self.config.user_tokens))
            self.programs[self.rng.randrange(len(self.programs))] = branch


def _fresh_ints(tokens: list[int]) -> list[int]:
    """Same values, new int objects (like a tokenizer's output)."""
    return array.array("q", tokens).tolist()


# ---------------------------------------------------------------------- runners


@dataclass(slots=True)
class RunResult:
    name: str
    ops: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    matched_tokens: int = 0
    evicted_tokens: int = 0
    tree_tokens: int = 0
    nodes: int = 0

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


@dataclass(slots=True)
class _SlotCounter:
    """Hands out fresh KV slot ids; the values the cache stores."""

    next_slot: int = 0
    freed: list[int] = field(default_factory=list)

    def take(self, n: int) -> list[int]:
        start = self.next_slot
        self.next_slot += n
        return list(range(start, start + n))


def run_progserve(trace: Iterable[Request], *, capacity: int, eviction: str,
                  encode_once: bool, on_step: Callable[[], None] | None = None) -> RunResult:
    """progserve's RadixCache. `encode_once`: the engine's way, one `TokenKey` per request
    (encoded at admission, extended by the output at finish); else plain token lists."""
    slots = _SlotCounter()
    cache = RadixCache(eviction=eviction, store_values=True, on_evict=slots.freed.extend)
    pin_waiting = eviction == "priority"
    keys = "TokenKey" if encode_once else "lists"
    result = RunResult(name=f"progserve RadixCache ({eviction}, {keys})")
    timer = time.perf_counter
    for request in trace:
        full = request.prompt + request.output
        values = slots.take(len(full))
        owner = request.program
        start = timer()
        if pin_waiting:
            cache.unpin(owner)  # the program is back from its tool
        if encode_once:
            key = TokenKey(request.prompt)
            matched = cache.match_prefix(key).length
            cache.insert(key.extended(request.output), values, owner=owner)
        else:
            matched = cache.match_prefix(request.prompt).length
            cache.insert(full, values, owner=owner)
        if pin_waiting:
            cache.pin(owner)  # ... and waits on the next one
        overflow = cache.total_size() - capacity
        if overflow > 0:
            result.evicted_tokens += cache.evict(overflow)
        result.seconds += timer() - start
        result.ops += 1
        result.prompt_tokens += len(request.prompt)
        result.matched_tokens += matched
        if on_step is not None:
            on_step()
    result.tree_tokens = cache.total_size()
    result.nodes = cache.num_nodes()
    return result


def sglang_unavailable_reason() -> str | None:
    if importlib.util.find_spec("sglang") is None:
        return "sglang is not installed"
    try:
        import sglang.srt.mem_cache.radix_cache  # noqa: F401
    except Exception as exc:  # its server internals need torch and much more
        return f"sglang's RadixCache does not import here: {type(exc).__name__}: {exc}"
    return None


def run_sglang(trace: Iterable[Request], *, capacity: int,
               on_step: Callable[[], None] | None = None) -> RunResult:
    """SGLang's own RadixCache (simulated allocator) on the same requests."""
    import torch
    from sglang.srt.mem_cache import radix_cache as sgl

    cache = sgl.RadixCache.create_simulated()
    api = _SGLangApi(sgl)
    result = RunResult(name="SGLang RadixCache (lru)")
    timer = time.perf_counter
    next_slot = 0
    for request in trace:
        full = request.prompt + request.output
        values = torch.arange(next_slot, next_slot + len(full), dtype=torch.int64)
        next_slot += len(full)
        start = timer()
        matched = api.match(cache, request.prompt)
        api.insert(cache, full, values)
        overflow = cache.total_size() - capacity
        if overflow > 0:
            before = cache.total_size()
            api.evict(cache, overflow)
            result.evicted_tokens += before - cache.total_size()
        result.seconds += timer() - start
        result.ops += 1
        result.prompt_tokens += len(request.prompt)
        result.matched_tokens += matched
        if on_step is not None:
            on_step()
    result.tree_tokens = cache.total_size()
    return result


class _SGLangApi:
    """Bridges SGLang versions: newer ones take *Params objects and RadixKey keys."""

    def __init__(self, sgl) -> None:  # noqa: ANN001 - a module
        self.key = getattr(sgl, "RadixKey", None) or (lambda tokens: tokens)
        self.params = None
        try:
            from sglang.srt.mem_cache import base_prefix_cache as base

            self.params = (base.MatchPrefixParams, base.InsertParams, base.EvictParams)
        except (ImportError, AttributeError):
            pass

    def match(self, cache, tokens: list[int]) -> int:  # noqa: ANN001
        key = self.key(tokens)
        found = (cache.match_prefix(self.params[0](key=key)) if self.params
                 else cache.match_prefix(key=key))
        return len(found.device_indices)

    def insert(self, cache, tokens: list[int], values) -> None:  # noqa: ANN001
        key = self.key(tokens)
        if self.params:
            cache.insert(self.params[1](key=key, value=values))
        else:
            cache.insert(key, values)

    def evict(self, cache, num_tokens: int) -> None:  # noqa: ANN001
        if self.params:
            cache.evict(self.params[2](num_tokens=num_tokens))
        else:
            cache.evict(num_tokens)


# -------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = TraceConfig()
    parser.add_argument("--ops", type=int, default=defaults.ops,
                        help="match+insert pairs to run (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--capacity", type=int, default=200_000,
                        help="cache capacity in tokens; evictions keep it below (default %(default)s)")
    parser.add_argument("--eviction", choices=["lru", "priority"], default="lru",
                        help="eviction order; priority pins each program between its turns")
    parser.add_argument("--compare-sglang", action="store_true",
                        help="also run SGLang's RadixCache on the same trace, if importable")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")


def main(args: argparse.Namespace) -> int:
    config = TraceConfig(ops=args.ops, seed=args.seed)
    runs = ["tokenkey", "lists"]
    sglang_note = None
    if args.compare_sglang:
        sglang_note = sglang_unavailable_reason()
        if sglang_note is None:
            runs.append("sglang")
    results = [_timed_run(config, args.capacity, args.eviction, run) for run in runs]
    _print_report(config, args.capacity, results, sglang_note)
    if args.json:
        payload = {"bench": "radix", "trace": asdict(config), "capacity": args.capacity,
                   "eviction": args.eviction, "results": [r.to_json() for r in results],
                   "sglang_note": sglang_note}
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=2)
    return 0


def _timed_run(config: TraceConfig, capacity: int, eviction: str, run: str) -> RunResult:
    from rich.progress import Progress

    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(f"radix ({run})", total=config.ops)

        def step() -> None:
            progress.advance(task)

        trace = AgentTrace(config)  # regenerated per run: same seed, same requests
        if run == "sglang":
            return run_sglang(trace, capacity=capacity, on_step=step)
        return run_progserve(trace, capacity=capacity, eviction=eviction,
                             encode_once=run == "tokenkey", on_step=step)


def _print_report(config: TraceConfig, capacity: int, results: list[RunResult],
                  sglang_note: str | None) -> None:
    print(f"radix bench: {config.ops} match+insert ops, seed {config.seed}, "
          f"capacity {capacity} tokens")
    for r in results:
        print(f"  {r.name:42s} {r.ops_per_s:9,.0f} ops/s ({r.to_json()['us_per_op']} us/op)"
              f"  hit rate {r.hit_rate:.1%}  tree {r.tree_tokens} tokens / {r.nodes} nodes"
              f"  evicted {r.evicted_tokens}")
    sglang = next((r for r in results if r.name.startswith("SGLang")), None)
    if sglang is not None and sglang.ops_per_s:
        for r in results:
            if r is not sglang:
                print(f"  {r.name} vs SGLang: {r.ops_per_s / sglang.ops_per_s:.2f}x")
    if sglang_note:
        print(f"  SGLang comparison skipped: {sglang_note}")

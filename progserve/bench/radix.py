"""Radix cache micro-benchmark: match+insert ops/s on a synthetic agent trace.

One op is what an engine does per request, timed as a whole: build the prompt's key from
the container the engine holds the tokens in (`--container`: `array("q")`, as SGLang's
scheduler holds them, a list, a numpy array or a torch tensor), match it, lock the
matched node, evict the shortfall when the free KV (capacity minus the tree) does not
cover the new tokens, extend the key with the output, insert the full sequence with its
KV slots, free the duplicate slots, unlock. Each cache runs twice over the trace: end to
end (`ops_per_s`, keys converted inside the timed part) and with keys packed beforehand
(`tree_ops_per_s`, the tree alone).

The trace is deterministic for a seed: a few shared system prompts (1-2k tokens),
programs whose contexts grow turn by turn (output, then a tool result or user message
appended), forks of a context into branches, and some fresh unrelated requests.

Every cache gets every request in turn (interleaved, so a busy machine slows all alike),
and only the thread CPU time of the op counts. With `--compare-sglang`, SGLang's own
RadixCache and its Rust-core UnifiedRadixCache run in the same loop (`radix_sglang.py`).
"""

from __future__ import annotations

import argparse
import array
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from engine_backend.radix_cache import RadixCache, TokenKey

from .radix_ops import Request, RunResult, Side

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


def _to_array(tokens: array.array) -> array.array:
    return array.array("q", tokens)


def _to_list(tokens: array.array) -> list[int]:
    return tokens.tolist()


def _to_numpy(tokens: array.array) -> Any:
    import numpy

    return numpy.frombuffer(tokens, dtype=numpy.uint16).astype(numpy.int64)


def _to_torch(tokens: array.array) -> Any:
    import torch

    return torch.from_numpy(_to_numpy(tokens))


# --container: how the engine holds a request's token ids (all int64 but the list).
CONTAINERS: dict[str, Callable[[array.array], Any]] = {
    "array": _to_array, "list": _to_list, "numpy": _to_numpy, "torch": _to_torch,
}


@dataclass(slots=True)
class _Program:
    pid: str
    context: array.array  # token ids so far
    turns_left: int


class AgentTrace:
    """Deterministic request stream of interleaved agent programs.

    Every request's token ids are a fresh container (`container`, see CONTAINERS), as a
    tokenizer or an engine would hand them over; the ids do not depend on the container."""

    def __init__(self, config: TraceConfig, container: str = "array") -> None:
        self.config = config
        self.hold = CONTAINERS[container]
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
        prompt = self._tokens(self.config.fresh_tokens)
        return Request("fresh", self.hold(prompt), self.hold(self._tokens(self.config.output_tokens)))

    def _program_turn(self) -> Request:
        index = self.rng.randrange(len(self.programs))
        program = self.programs[index]
        output = self._tokens(self.config.output_tokens)
        request = Request(program.pid, self.hold(program.context), self.hold(output))
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


def _free(slots: object) -> None:
    """Where an engine returns slots to its KV pool; the bench tracks no memory (SGLang's
    side gets the same no-op allocator)."""


class ProgserveSide:
    """progserve's RadixCache, used as the sim and torch engines use it: a `TokenKey` built
    from the engine's container at admission, extended by the output at finish."""

    def __init__(self, *, capacity: int, eviction: str, prepacked: bool,
                 values: bool = True) -> None:
        self.capacity = capacity
        self.prepacked = prepacked
        self.values = values
        self.pin_waiting = eviction == "priority"
        self.cache = RadixCache(eviction=eviction, store_values=values, on_evict=_free)
        self.next_slot = 0
        kind = "" if values else ", no values"
        self.result = RunResult(name=f"progserve RadixCache ({eviction}{kind})",
                                prepacked=prepacked)

    def prepare(self, request: Request) -> tuple[list[int] | None, TokenKey | None,
                                                   TokenKey | None]:
        start = self.next_slot
        self.next_slot += len(request.prompt) + len(request.output)
        slots = list(range(start, self.next_slot)) if self.values else None
        if not self.prepacked:
            return slots, None, None
        prompt = TokenKey(request.prompt)
        return slots, prompt, prompt.extended(request.output)

    def op(self, request: Request, prepared: Any) -> tuple[int, int]:
        cache, owner = self.cache, request.program
        slots, prompt, full = prepared
        if prompt is None:
            prompt = TokenKey(request.prompt)
        if self.pin_waiting:
            cache.unpin(owner)  # the program is back from its tool
        match = cache.match_prefix(prompt)
        cache.inc_lock_ref(match.node)
        shortfall = (len(prompt) - match.length + len(request.output)) - (
            self.capacity - cache.total_size())
        evicted = cache.evict(shortfall) if shortfall > 0 else 0
        if full is None:
            full = prompt.extended(request.output)
        inserted = cache.insert(full, slots, owner=owner)
        if slots is not None:
            _free(slots[match.length : inserted])  # duplicates
        cache.dec_lock_ref(match.node)
        if self.pin_waiting:
            cache.pin(owner)  # ... and waits on the next one
        return match.length, evicted

    def size(self) -> int:
        return self.cache.total_size()


def run_sides(trace: Iterable[Request], sides: list[Side],
              on_step: Callable[[], None] | None = None) -> list[RunResult]:
    """Feeds every request to every side in turn (rotating who goes first), so load
    changes on a shared machine hit all sides alike. Times the thread CPU time of `op`."""
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


# --------------------------------------------------------------------- results


@dataclass(slots=True)
class CacheReport:
    """One cache over every repeat: end to end and tree-only, medians first."""

    name: str
    end_to_end: list[RunResult]
    tree_only: list[RunResult]

    def ops_per_s(self) -> float:
        return statistics.median(r.ops_per_s for r in self.end_to_end)

    def tree_ops_per_s(self) -> float:
        return statistics.median(r.ops_per_s for r in self.tree_only)

    def to_json(self) -> dict[str, Any]:
        last, tree = self.end_to_end[-1], self.tree_only[-1]
        ops_per_s = self.ops_per_s()
        return {
            "name": self.name, "ops": last.ops,
            "ops_per_s": round(ops_per_s, 1),
            "tree_ops_per_s": round(self.tree_ops_per_s(), 1),
            "us_per_op": round(1e6 / ops_per_s, 2) if ops_per_s else 0.0,
            "ops_per_s_runs": [round(r.ops_per_s, 1) for r in self.end_to_end],
            "tree_ops_per_s_runs": [round(r.ops_per_s, 1) for r in self.tree_only],
            "hit_rate": round(last.hit_rate, 4), "tree_hit_rate": round(tree.hit_rate, 4),
            "prompt_tokens": last.prompt_tokens, "matched_tokens": last.matched_tokens,
            "evicted_tokens": last.evicted_tokens, "tree_tokens": last.tree_tokens,
        }


def ratios(ours: CacheReport, theirs: CacheReport) -> dict[str, float]:
    """ours / theirs, the median over repeats of each repeat's ratio (a repeat's sides ran
    interleaved, under the same load)."""
    def median_ratio(a: list[RunResult], b: list[RunResult]) -> float:
        return round(statistics.median(x.ops_per_s / y.ops_per_s for x, y in zip(a, b, strict=True)), 3)

    return {"ops_per_s": median_ratio(ours.end_to_end, theirs.end_to_end),
            "tree_ops_per_s": median_ratio(ours.tree_only, theirs.tree_only)}


# -------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = TraceConfig()
    parser.add_argument("--ops", type=int, default=defaults.ops,
                        help="requests (match+insert pairs) per cache (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--capacity", type=int, default=200_000,
                        help="KV capacity in tokens; a request's shortfall is evicted "
                             "(default %(default)s)")
    parser.add_argument("--container", choices=sorted(CONTAINERS), default="array",
                        help="what the engine holds token ids in: array('q') (as SGLang's "
                             "scheduler), list, numpy or torch int64 (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of the whole trace with fresh caches; medians are "
                             "reported (default %(default)s)")
    parser.add_argument("--eviction", choices=["lru", "priority"], default="lru",
                        help="our eviction order; priority pins each program between its turns")
    parser.add_argument("--compare-sglang", action="store_true",
                        help="also run SGLang's RadixCache and UnifiedRadixCache on the same "
                             "requests, if they import")
    parser.add_argument("--no-values", action="store_true",
                        help="our cache stores no per-token values (the sim engine's mode)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")


def main(args: argparse.Namespace) -> int:
    if args.ops < 1 or args.repeats < 1 or args.capacity < 1:
        raise SystemExit("--ops, --repeats and --capacity must be positive")
    config = TraceConfig(ops=args.ops, seed=args.seed)
    values = not args.no_values
    sglang, sglang_note, cut_short = None, None, {}
    if args.compare_sglang:
        from progserve.bench.radix_sglang import import_sglang_caches

        imported = import_sglang_caches()
        if isinstance(imported, str):
            sglang_note = imported
        else:
            sglang, sglang_note, cut_short = imported, imported.note, imported.cut_short
    reports: dict[str, CacheReport] = {}
    for repeat in range(args.repeats):
        sides = _make_sides(args, values, sglang)
        results = _run_with_progress(AgentTrace(config, args.container), sides,
                                     f"radix bench {repeat + 1}/{args.repeats}")
        for result in results:
            report = reports.setdefault(result.name, CacheReport(result.name, [], []))
            (report.tree_only if result.prepacked else report.end_to_end).append(result)
    ordered = list(reports.values())
    comparisons = {theirs.name: ratios(ordered[0], theirs) for theirs in ordered[1:]}
    _print_report(args, config, ordered, comparisons, sglang_note)
    if args.json:
        payload = {
            "bench": "radix", "trace": asdict(config), "capacity": args.capacity,
            "container": args.container, "eviction": args.eviction, "repeats": args.repeats,
            "timer": "thread CPU time", "values": values,
            "ops_per_s": round(ordered[0].ops_per_s(), 1),
            "tree_ops_per_s": round(ordered[0].tree_ops_per_s(), 1),
            "results": [r.to_json() for r in ordered],
            "ratios": comparisons, "sglang_note": sglang_note,
            "sglang_modules_cut_short": cut_short,
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=2)
    return 0


def _make_sides(args: argparse.Namespace, values: bool, sglang: Any) -> list[Side]:
    sides: list[Side] = []
    for prepacked in (False, True):
        sides.append(ProgserveSide(capacity=args.capacity, eviction=args.eviction,
                                   prepacked=prepacked, values=values))
        if sglang is None:
            continue
        from progserve.bench.radix_sglang import SGLangSide

        sides.append(SGLangSide(sglang, capacity=args.capacity, unified=False,
                                prepacked=prepacked))
        if sglang.unified is not None:
            sides.append(SGLangSide(sglang, capacity=args.capacity, unified=True,
                                    prepacked=prepacked))
    return sides


def _run_with_progress(trace: AgentTrace, sides: list[Side], label: str) -> list[RunResult]:
    from rich.progress import Progress

    with Progress(transient=True, disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task(label, total=trace.config.ops)
        return run_sides(trace, sides, on_step=lambda: progress.advance(task))


def _print_report(args: argparse.Namespace, config: TraceConfig, reports: list[CacheReport],
                  comparisons: dict[str, dict[str, float]], sglang_note: str | None) -> None:
    print(f"radix bench: {config.ops} requests per cache, seed {config.seed}, capacity "
          f"{args.capacity} tokens, keys from {args.container}; thread CPU time of each "
          f"op, median of {args.repeats} runs")
    print(f"  {'cache':40s} {'end to end':>12s} {'tree only':>12s}  hit rate  evicted")
    for r in reports:
        row = r.to_json()
        print(f"  {r.name:40s} {row['ops_per_s']:>8,.0f}/s   {row['tree_ops_per_s']:>8,.0f}/s"
              f"   {row['hit_rate']:6.1%}  {row['evicted_tokens']}")
    for name, ratio in comparisons.items():
        print(f"  {reports[0].name} / {name}: {ratio['ops_per_s']:.2f}x end to end, "
              f"{ratio['tree_ops_per_s']:.2f}x tree only")
    if sglang_note:
        print(f"  SGLang comparison incomplete: {sglang_note}")


if __name__ == "__main__":  # `python -m progserve.bench.radix`, e.g. inside an SGLang venv
    _parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    configure(_parser)
    sys.exit(main(_parser.parse_args()))

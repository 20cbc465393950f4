"""Continuous batching for the sim engine, SGLang style, advanced event by event.

The batcher is synchronous and knows nothing of clocks: `SimEngine` asks it for the next
plan, sleeps for the plan's duration (virtual or real), then commits it.

- Waiting requests are ordered by priority (lower first), then arrival (FCFS).
- Each step admits prefill work up to `chunked_prefill_tokens` (a long prompt is split
  over several steps) and decodes every running request by one token (mixed batches).
- KV lives in the radix cache (`engine_backend.radix_cache`), with a capacity in tokens:
  a request's prompt prefix is matched (cached tokens are not prefilled) and locked while
  it runs; its prompt is inserted once prefilled (so concurrent siblings share it) and its
  output when it finishes. Tokens not yet in the tree are the request's private KV.
- Decode lengths are unknown to the batcher: KV is taken token by token as requests decode.
  Admission keeps SGLang's headroom: the running requests' remaining `max_new_tokens`
  (clipped) times `new_token_ratio`, a ratio that decays every step and is re-estimated
  after a retraction. When a step cannot get KV: evict unlocked cache, then retract the
  lowest-priority running request (its private KV is freed; it waits again and re-prefills
  its prompt plus the output so far: `preemptions`, `recomputed_tokens`).
- Between events the batch is constant, so `plan` covers many decode steps at once in
  closed form (`StepCostModel.decode_span`). Events: a request finishes, KV runs out, a
  prefill chunk completes, the admission headroom decays, a stream interval passes.

The reply (hence its length) is known to the simulator so that it can jump to the next
finish event; admission, reservation and retraction never read it.

Per-request state is lazy: a decoding request's generated count is `gen + step - step0`,
and sums over the decode batch (private KV, context, reservation) are kept as
`key + n * step`, so an event costs O(log n), not O(batch).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine_backend.outbox import ChunkOutbox
from engine_backend.radix_cache import RadixCache, TokenKey, TreeNode
from engine_backend.sim.config import SimConfig
from engine_backend.sim.cost_model import StepCostModel
from engine_backend.sim.responders import Reply

if TYPE_CHECKING:

    from engine_backend.types import GenerateRequest

WAITING, PREFILLING, DECODING, DONE = 0, 1, 2, 3
# While the admission headroom decays, re-check a blocked queue this often (steps).
ADMISSION_RECHECK_STEPS = 32
# When the next steps need KV, evict ahead for this many steps at once.
EVICT_AHEAD_STEPS = 64
_NEVER = 1 << 62


@dataclass(slots=True, eq=False)
class SimRequest:
    """One request's state in the batcher (and its stream, owned by the engine)."""

    rid: str
    prompt: list[int]
    key: TokenKey  # the prompt, encoded once for the radix cache
    priority: float
    program_id: str | None
    max_new: int
    reserve: int  # min(max_new, clip): the admission reservation of its output
    reply: Reply
    target: int  # len(reply): output tokens it will have when it finishes
    seed: int
    request: GenerateRequest
    prompt_pieces: list[str] | None = None
    seq: int = 0  # arrival order
    state: int = WAITING
    epoch: int = 0  # bumped when it leaves the decode batch (stale heap entries)
    gen: int = 0  # tokens generated as of step0
    step0: int = 0
    tree_len: int = 0  # tokens of its sequence held in the tree (locked) while decoding
    fill: TokenKey | None = None  # the sequence prefilled at its admission
    fill_len: int = 0
    published: bool = False  # its prefilled sequence is in the tree
    prefilled: int = 0  # tokens of `fill` with KV
    extend_start: int = 0  # the cache hit of the current admission
    computed: int = 0  # the most tokens it ever had KV for (recompute accounting)
    cached_tokens: int = 0  # cache hit at its first admission (reported)
    admitted: bool = False
    lock_node: TreeNode | None = None
    # stream side
    emitted: int = 0
    outbox: ChunkOutbox = field(default_factory=ChunkOutbox)


@dataclass(slots=True)
class StepPlan:
    steps: int
    seconds: float  # GPU time of all `steps` (before time scaling)
    batch: int  # decoding requests
    context: int  # their total context at the first step
    prefill: list[tuple[SimRequest, int, int]] | None  # (request, tokens, start position)


class ContinuousBatcher:
    def __init__(
        self,
        config: SimConfig,
        cost: StepCostModel,
        cache: RadixCache,
        on_finish: Callable[[SimRequest], None],
        on_progress: Callable[[SimRequest, int], None] | None = None,
    ) -> None:
        self.config = config
        self.cost = cost
        self.cache = cache
        self.capacity = config.kv_capacity_tokens
        self._on_finish = on_finish
        self._on_progress = on_progress
        self.step = 0
        self._seq = itertools.count()
        self._waiting: list[tuple[float, int, SimRequest]] = []
        self.n_waiting = 0
        self.prefilling: list[SimRequest] = []
        self.decoding: dict[SimRequest, None] = {}  # an ordered set
        self._finishes: list[tuple[int, int, int, SimRequest]] = []
        self._heap_seq = itertools.count()
        # Sums over the decode batch, as key + n_dec * step (see the module docstring).
        self.n_dec = 0
        self._private_key = 0
        self._context_key = 0
        self._reserve_key = 0
        # Prompt tokens being prefilled (not yet in the tree), plus one slot each for the
        # token its prefill samples.
        self._prefill_private = 0
        # Prefilled prompts not yet in the tree, by program (see `_prefill_done`).
        # Insertion-ordered (dicts as sets): publishing order must not depend on addresses.
        self._unpublished: dict[str, dict[SimRequest, None]] = {}
        self._batch: list[tuple[SimRequest, int, int]] = []
        # Tags cost a set insert per tree node; only the `priority` order reads them (pins).
        self.tag_owners = config.eviction != "lru"
        self.ratio = config.init_new_token_ratio
        self._ratio_decay = (
            config.init_new_token_ratio - config.min_new_token_ratio
        ) / config.new_token_ratio_decay_steps
        # cumulative counters
        self.cache_hit_tokens = 0
        self.cache_query_tokens = 0
        self.preemptions = 0
        self.recomputed_tokens = 0

    # ------------------------------------------------------------------ queries

    def kv_used(self) -> int:
        return (
            self.cache.total_size()
            + self._private_key
            + self.n_dec * self.step
            + self._prefill_private
        )

    def generated(self, r: SimRequest) -> int:
        """Tokens `r` has generated by now."""
        return r.gen + self.step - r.step0 if r.state == DECODING else r.gen

    def running(self) -> int:
        return self.n_dec + len(self.prefilling)

    # ----------------------------------------------------------------- requests

    def enqueue(self, r: SimRequest) -> None:
        r.seq = next(self._seq)
        r.state = WAITING
        heapq.heappush(self._waiting, (r.priority, r.seq, r))
        self.n_waiting += 1

    def abort(self, r: SimRequest) -> int:
        """Remove `r` wherever it is and free its KV; returns the tokens it generated."""
        if r.state == WAITING:
            self.n_waiting -= 1  # its heap entry goes stale
        elif r.state == PREFILLING:
            self.prefilling.remove(r)
            self._prefill_private -= r.fill_len - r.extend_start + 1
            self._unlock(r)
        elif r.state == DECODING:  # like SGLang, cache what it computed
            self._remove_decoding(r)
            self._forget_unpublished(r)
            key = r.key.extended(r.reply.token_ids[: r.gen])
            self._insert(key, r)
            self._unlock(r)
        r.state = DONE
        return r.gen

    # -------------------------------------------------------------- event loop

    def boundary(self) -> None:
        """Everything that happens between two steps: finishes, stream progress, KV for
        the next decode step (evict, retract), admissions."""
        self._finish_due()
        if self._on_progress is not None and self.config.stream_interval:
            step, progress = self.step, self._on_progress
            for r in self.decoding:
                progress(r, r.gen + step - r.step0)
        if not self.n_dec and not self.prefilling:
            self.ratio = self.config.init_new_token_ratio
        self._ensure_decode_memory()
        self._schedule_prefill()

    def plan(self) -> StepPlan | None:
        """The steps until the next event, or None when nothing runs."""
        n = self.n_dec
        context = self._context_key + n * self.step
        batch = self._batch
        if batch:
            tokens = pairs = 0
            for _, count, start in batch:
                tokens += count
                pairs += count * (2 * start + count + 1) // 2
            seconds = self.cost.step_time(tokens, pairs, n, context)
            return StepPlan(1, seconds, n, context, batch)
        if not n:
            return None
        steps = self._steps_to_next_finish()
        if self.config.stream_interval:
            steps = min(steps, self.config.stream_interval)
        if self.n_waiting and self.ratio > self.config.min_new_token_ratio:
            steps = min(steps, ADMISSION_RECHECK_STEPS)
        free = self.capacity - self.kv_used()
        if free < n * steps:
            want = n * min(steps, EVICT_AHEAD_STEPS) - free
            if want > 0 and self.cache.evictable_size():
                self.cache.evict(want)
                free = self.capacity - self.kv_used()
            steps = max(1, min(steps, free // n))
        return StepPlan(steps, self.cost.decode_span(n, context, steps), n, context, None)

    def commit(self, plan: StepPlan) -> None:
        """The plan's steps ran."""
        self.step += plan.steps
        decayed = self.ratio - plan.steps * self._ratio_decay
        self.ratio = max(self.config.min_new_token_ratio, decayed)
        if plan.prefill:
            for r, count, start in plan.prefill:
                if r.state != PREFILLING or r.prefilled != start:
                    continue  # aborted meanwhile
                r.prefilled = start + count
                if r.prefilled >= r.fill_len:
                    self._prefill_done(r)
        self._batch = []

    # ------------------------------------------------------------ decode batch

    def _add_decoding(self, r: SimRequest) -> None:
        r.state = DECODING
        r.step0 = step = self.step
        base = len(r.prompt) + r.gen - step
        self.n_dec += 1
        self._private_key += base - r.tree_len
        self._context_key += base
        self._reserve_key += r.reserve - r.gen + step
        self.decoding[r] = None
        finish_step = step + r.target - r.gen
        heapq.heappush(self._finishes, (finish_step, next(self._heap_seq), r.epoch, r))

    def _remove_decoding(self, r: SimRequest) -> None:
        base = len(r.prompt) + r.gen - r.step0
        self.n_dec -= 1
        self._private_key -= base - r.tree_len
        self._context_key -= base
        self._reserve_key -= r.reserve - r.gen + r.step0
        del self.decoding[r]
        r.gen += self.step - r.step0
        r.step0 = self.step
        r.epoch += 1

    def _steps_to_next_finish(self) -> int:
        heap = self._finishes
        while heap:
            finish_step, _, epoch, r = heap[0]
            if r.epoch == epoch and r.state == DECODING:
                return max(1, finish_step - self.step)
            heapq.heappop(heap)
        return _NEVER

    def _finish_due(self) -> None:
        heap, step = self._finishes, self.step
        while heap and heap[0][0] <= step:
            _, _, epoch, r = heapq.heappop(heap)
            if r.epoch == epoch and r.state == DECODING:
                self._finish(r)

    def _finish(self, r: SimRequest) -> None:
        self._remove_decoding(r)
        self._forget_unpublished(r)
        key = r.key.extended(r.reply.token_ids)
        self._insert(key, r)
        self._unlock(r)
        r.state = DONE
        self._on_finish(r)

    def _insert(self, key: TokenKey, r: SimRequest) -> TreeNode:
        """Cache `key` for `r`; returns the node where it ends. `r` still holds its lock,
        on a prefix of `key`: the walk starts there."""
        owner = r.program_id if self.tag_owners else None
        return self.cache.insert_path(key, owner=owner, priority=-r.priority,
                                      namespace=r.request.cache_salt, below=r.lock_node)[1]

    def _unlock(self, r: SimRequest) -> None:
        if r.lock_node is not None:
            self.cache.dec_lock_ref(r.lock_node)
            r.lock_node = None
        r.tree_len = 0

    # ---------------------------------------------------------- memory pressure

    def _ensure_decode_memory(self) -> None:
        """KV for one more token per decoding request: evict, then retract."""
        n = self.n_dec
        if not n:
            return
        free = self.capacity - self.kv_used()
        if free >= n:
            return
        self.cache.evict(n - free)
        free = self.capacity - self.kv_used()
        retracted = False
        while self.n_dec and free < self.n_dec:
            self._retract(self._retraction_victim())
            retracted = True
            free = self.capacity - self.kv_used()
            if free < self.n_dec:
                self.cache.evict(self.n_dec - free)
                free = self.capacity - self.kv_used()
        if retracted:
            self._reestimate_ratio()

    def _retraction_victim(self) -> SimRequest:
        # Lowest priority first; then, as SGLang does, the least decoded, longest prompt.
        step = self.step
        return max(
            self.decoding,
            key=lambda r: (r.priority, -(r.gen + step - r.step0), len(r.prompt), r.seq),
        )

    def _retract(self, r: SimRequest) -> None:
        self._remove_decoding(r)
        r.computed = max(r.computed, len(r.prompt) + r.gen)
        if not r.published:  # as in SGLang, its prefilled prompt stays cached (evictable)
            self._forget_unpublished(r)
            self._insert(r.fill, r)
        self._unlock(r)  # its decoded KV is freed
        r.state = WAITING
        heapq.heappush(self._waiting, (r.priority, r.seq, r))
        self.n_waiting += 1
        self.preemptions += 1

    def _reestimate_ratio(self) -> None:
        # SGLang's retract_decode: (decoded + retract_decode_steps * reqs) / max_new_tokens.
        step = self.step
        decoded = sum(r.gen + step - r.step0 for r in self.decoding)
        budget = sum(r.max_new for r in self.decoding)
        if budget:
            extra = self.config.retract_decode_steps * self.n_dec
            self.ratio = min(1.0, (decoded + extra) / budget)

    # ---------------------------------------------------------------- admission

    def _schedule_prefill(self) -> None:
        budget = self.config.chunked_prefill_tokens
        batch: list[tuple[SimRequest, int, int]] = []
        for r in self.prefilling:  # chunks of prompts already admitted come first
            count = min(r.fill_len - r.prefilled, budget)
            batch.append((r, count, r.prefilled))
            budget -= count
            if not budget:
                break
        while budget > 0 and self.n_waiting:
            r = self._head()
            if not self._admit(r):
                if self._preempt_for(r):
                    continue
                break  # head-of-line: the queue waits for its head
            heapq.heappop(self._waiting)
            self.n_waiting -= 1
            count = min(r.fill_len - r.prefilled, budget)
            batch.append((r, count, r.prefilled))
            budget -= count
        self._batch = batch

    def _head(self) -> SimRequest:
        heap = self._waiting
        while heap[0][2].state != WAITING:  # aborted while waiting
            heapq.heappop(heap)
        return heap[0][2]

    def _admit(self, r: SimRequest) -> bool:
        config, cache = self.config, self.cache
        if self.n_dec + len(self.prefilling) >= config.max_running:
            return False
        busy = self.n_dec or self.prefilling
        if busy:  # SGLang's headroom; first a check that needs no tree walk
            headroom = self.ratio * max(0, self._reserve_key - self.n_dec * self.step)
            own = max(0, min(r.max_new - r.gen, config.clip_max_new_tokens)) + self.n_dec
            room = self.capacity - self.kv_used() + cache.evictable_size() - headroom
            if 2 + own > room:  # even a full cache hit would not fit
                return False
        if r.program_id in self._unpublished:
            self._publish_program(r.program_id)
        fill = r.key if not r.gen else r.key.extended(r.reply.token_ids[: r.gen])
        fill_len = len(r.prompt) + r.gen
        match = cache.match_prefix(fill, namespace=r.request.cache_salt)
        cached = min(match.length, fill_len - 1)  # the last token is always computed
        extend = fill_len - cached
        cache.inc_lock_ref(match.node)
        free = self.capacity - self.kv_used()
        available = free + cache.evictable_size()
        if busy:
            fits = extend + 1 + own <= available - headroom
        else:
            fits = extend + 1 <= available  # alone, it may use everything
        if not fits:
            cache.dec_lock_ref(match.node)
            return False
        needed = extend + 1 + self.n_dec - free
        if needed > 0:
            cache.evict(needed)
        r.state = PREFILLING
        r.fill, r.fill_len, r.published = fill, fill_len, False
        r.prefilled = r.extend_start = cached
        r.lock_node = match.node
        self._prefill_private += extend + 1
        self.prefilling.append(r)
        if not r.admitted:
            r.admitted = True
            r.cached_tokens = cached
            self.cache_hit_tokens += cached
            self.cache_query_tokens += len(r.prompt)
        else:
            self.recomputed_tokens += max(0, min(fill_len, r.computed) - cached)
        return True

    def _preempt_for(self, r: SimRequest) -> bool:
        """Priority preemption: retract a running request that `r` outranks."""
        if not self.config.priority_preemption or not self.decoding:
            return False
        step = self.step
        victim = max(
            self.decoding, key=lambda d: (d.priority, -(d.gen + step - d.step0), d.seq)
        )
        if victim.priority <= r.priority:
            return False
        self._retract(victim)
        return True

    def _prefill_done(self, r: SimRequest) -> None:
        """The prompt is prefilled. SGLang inserts it into the tree right away so that
        concurrent requests share it; inserting costs a tree walk (plus one more to find
        the node to lock), so a request with a program id publishes lazily: when another
        request of its program is admitted (forks, parallel calls), when it is retracted,
        or at its finish. Other programs only share what is already in the tree (system
        prompts, earlier turns), so what they can hit is the same."""
        self.prefilling.remove(r)
        self._prefill_private -= r.fill_len - r.extend_start + 1  # now the request's own KV
        r.tree_len = r.extend_start
        r.computed = max(r.computed, r.fill_len)
        if r.gen >= r.target:  # max_new_tokens = 0: prefill only
            self._insert(r.fill, r)
            self._unlock(r)
            r.state = DONE
            self._on_finish(r)
            return
        r.gen += 1  # the prefill step samples the first token
        self._add_decoding(r)
        if r.program_id is None:
            self._publish(r)
        else:
            self._unpublished.setdefault(r.program_id, {})[r] = None

    def _publish(self, r: SimRequest) -> None:
        """Insert a decoding request's prefilled sequence and move its lock there."""
        assert r.fill is not None and r.lock_node is not None
        cache = self.cache
        node = self._insert(r.fill, r)
        cache.inc_lock_ref(node)
        cache.dec_lock_ref(r.lock_node)
        r.lock_node = node
        self._private_key -= r.fill_len - r.tree_len
        r.tree_len = r.fill_len
        r.published = True

    def _publish_program(self, program_id: str) -> None:
        for r in self._unpublished.pop(program_id):
            self._publish(r)

    def _forget_unpublished(self, r: SimRequest) -> None:
        if r.published or r.program_id is None:
            return
        pending = self._unpublished.get(r.program_id)
        if pending is not None:
            pending.pop(r, None)
            if not pending:
                del self._unpublished[r.program_id]

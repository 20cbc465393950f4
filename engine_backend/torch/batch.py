"""Continuous batching for the torch engine, over real KV slots (SGLang's scheduler, small).

The batcher runs on the event loop, between model steps; the worker thread only executes
the `StepPlan` it builds. Conventions are the sim engine's (`engine_backend/sim/batch.py`):

- Waiting requests are ordered by priority (lower first), then arrival.
- A step decodes every running request by one token and adds prompt chunks up to
  `chunked_prefill_tokens` (chunked prefill): one mixed forward pass.
- Prefixes: a request's prompt is matched in the radix tree; the matched slots are shared
  (locked while it runs), only the rest is prefilled. Its prompt is inserted once
  prefilled (concurrent siblings share it), the whole sequence when it finishes; slots
  that duplicate what the tree already had are freed.
- KV shortage: evict unlocked cache, then retract the lowest-priority running request.
  `recompute`: its sequence goes to the tree (evictable) and it re-prefills whatever was
  evicted; `swap`: its private KV moves to host memory and comes back on resume.
- Priority preemption: a waiting request that cannot be admitted retracts a running one
  of strictly lower priority.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine_backend.radix_cache import RadixCache, TokenKey, TreeNode
from engine_backend.types import FinishReason, FinishType

from .config import TorchConfig
from .kv_pool import KVPool
from .model import DecodeGroup, ExtendSegment, ForwardBatch
from .sampling import RowSampling

if TYPE_CHECKING:
    from .constrained import GrammarMask

NEW, WAITING, PREFILLING, DECODING, DONE = -1, 0, 1, 2, 3  # NEW: not yet enqueued


@dataclass(slots=True)
class SwappedKV:
    """A retracted request's KV on the host (`swap` preemption): all `length` tokens, so
    that resuming never recomputes, whatever the tree evicted meanwhile; the part the tree
    still holds is taken from the tree instead."""

    length: int
    host: torch.Tensor  # [layers * 2, length, width]


@dataclass(slots=True, eq=False)
class TorchRequest:
    rid: str
    prompt: list[int]
    key: TokenKey  # the prompt, encoded once for the radix tree
    priority: float
    program_id: str | None
    max_new: int
    min_new: int
    stop_ids: frozenset[int]
    sampling: RowSampling
    input_logprob_start: int  # -1: no prompt logprobs
    grammar: GrammarMask | None = None
    cache_salt: str | None = None  # its radix namespace: prefixes are shared within a salt
    seq: int = 0
    state: int = NEW
    output: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: dict[int, float] = field(default_factory=dict)  # position -> logprob
    slots: list[int] = field(default_factory=list)  # KV of tokens()[: len(slots)]
    tree_len: int = 0  # leading slots owned by the tree, locked through `lock_node`
    lock_node: TreeNode | None = None
    fill_len: int = 0  # tokens this admission prefills up to
    prefilled: int = 0  # tokens with KV in this admission
    cached_tokens: int = 0  # cache hit at the first admission (reported)
    admitted: bool = False
    computed: int = 0  # the most tokens it ever had KV for (recompute accounting)
    swapped: SwappedKV | None = None
    finish: FinishReason | None = None

    def tokens(self) -> list[int]:
        return self.prompt + self.output if self.output else self.prompt

    def token_key(self, length: int) -> TokenKey:
        extra = length - len(self.prompt)
        return self.key if extra <= 0 else self.key.extended(self.output[:extra])


@dataclass(slots=True)
class StepPlan:
    batch: ForwardBatch
    extends: list[tuple[TorchRequest, int, int]]  # (request, start position, tokens)
    # Logits rows: first one per request that samples a token (`sample`, in order), then
    # the rows that score prompt tokens: (request, first scored position, count) in
    # `prompt_logprobs`, their target tokens concatenated in `logprob_targets`.
    sample: list[TorchRequest]
    prompt_logprobs: list[tuple[TorchRequest, int, int]]
    logprob_targets: torch.Tensor


@dataclass(slots=True)
class StepOutput:
    tokens: list[int]
    logprobs: list[float]
    prompt_logprobs: list[float]


@dataclass(slots=True)
class TokenEvent:
    request: TorchRequest
    token: int
    logprob: float


class TorchBatcher:
    def __init__(self, config: TorchConfig, pool: KVPool, cache: RadixCache | None) -> None:
        self.config = config
        self.pool = pool
        self.cache = cache
        self._seq = itertools.count()
        self._waiting: list[tuple[float, int, TorchRequest]] = []
        self.n_waiting = 0
        self.prefilling: list[TorchRequest] = []
        self.decoding: dict[TorchRequest, None] = {}  # insertion-ordered set
        self._prefill_pending = 0  # prompt tokens admitted but not yet given slots
        # counters (EngineStats)
        self.cache_hit_tokens = 0
        self.cache_query_tokens = 0
        self.preemptions = 0
        self.recomputed_tokens = 0
        self.swap_ins = 0  # retracted requests whose KV came back from host memory

    # ------------------------------------------------------------------ state

    def running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    def idle(self) -> bool:
        return not (self.decoding or self.prefilling or self.n_waiting)

    def enqueue(self, r: TorchRequest) -> None:
        r.seq = next(self._seq)
        self._push_waiting(r)

    def _push_waiting(self, r: TorchRequest) -> None:
        r.state = WAITING
        heapq.heappush(self._waiting, (r.priority, r.seq, r))
        self.n_waiting += 1

    def abort(self, r: TorchRequest) -> None:
        """Remove `r` wherever it is and free its KV."""
        if r.state == WAITING:
            self.n_waiting -= 1  # its heap entry goes stale
        elif r.state == PREFILLING:
            self.prefilling.remove(r)
            self._prefill_pending -= r.fill_len - r.prefilled
            self._release(r)
        elif r.state == DECODING:
            del self.decoding[r]
            self._release(r)
        r.swapped = None
        r.state = DONE

    def finish(self, r: TorchRequest, reason: FinishReason) -> None:
        """`r` is done: its sequence goes to the tree, its KV lock is released."""
        if r.state == DONE:
            return
        r.finish = reason
        if r.state == DECODING:
            del self.decoding[r]
            self._cache_prefix(r, len(r.slots))
            self._release(r)
        else:  # not decoding: it has no sequence worth keeping
            self.abort(r)
        r.state = DONE

    # ---------------------------------------------------------------- KV slots

    def _available(self) -> int:
        evictable = self.cache.evictable_size() if self.cache is not None else 0
        return self.pool.free_slots + evictable

    def _alloc(self, n: int) -> list[int]:
        short = n - self.pool.free_slots
        if short > 0 and self.cache is not None:
            self.cache.evict(short)
        return self.pool.alloc(n)

    def _cache_prefix(self, r: TorchRequest, length: int) -> None:
        """Insert `r`'s first `length` tokens (with their slots) into the tree and move its
        lock there; slots that duplicate the tree's are freed and replaced by the tree's."""
        cache = self.cache
        if cache is None or length <= r.tree_len:
            return
        key = r.token_key(length)
        salt = r.cache_salt
        present = cache.insert(key, r.slots[:length], owner=r.program_id, priority=-r.priority,
                               namespace=salt)
        if present > r.tree_len:
            self.pool.free(r.slots[r.tree_len : present])
        match = cache.match_prefix(key, touch=False, namespace=salt)
        r.slots[:length] = match.value
        cache.inc_lock_ref(match.node)
        if r.lock_node is not None:
            cache.dec_lock_ref(r.lock_node)
        r.lock_node = match.node
        r.tree_len = length

    def _release(self, r: TorchRequest) -> None:
        """Free `r`'s private slots and unlock its tree prefix."""
        self.pool.free(r.slots[r.tree_len :])
        if r.lock_node is not None and self.cache is not None:
            self.cache.dec_lock_ref(r.lock_node)
        r.lock_node = None
        r.slots = []
        r.tree_len = 0

    # ---------------------------------------------------------------- planning

    def plan(self) -> StepPlan | None:
        """The next step's work, with slots allocated; None when there is nothing to run."""
        self._ensure_decode_slots()
        chunks = self._schedule_prefill()
        if not self.decoding and not chunks:
            return None
        return self._build(chunks)

    def _ensure_decode_slots(self) -> None:
        while self.decoding and self._available() < len(self.decoding):
            self._retract(self._retraction_victim())

    def _retraction_victim(self) -> TorchRequest:
        # Lowest priority first; then, as SGLang does, the least decoded.
        return max(self.decoding, key=lambda r: (r.priority, -len(r.output), r.seq))

    def _retract(self, r: TorchRequest) -> None:
        del self.decoding[r]
        length = len(r.slots)
        r.computed = max(r.computed, length)
        if self.config.preemption == "swap":
            r.swapped = SwappedKV(length, self.pool.swap_out(r.slots))
        else:
            self._cache_prefix(r, length)
        self._release(r)
        self._push_waiting(r)
        self.preemptions += 1

    def _schedule_prefill(self) -> list[tuple[TorchRequest, int, int]]:
        budget = self.config.chunked_prefill_tokens
        chunks: list[tuple[TorchRequest, int, int]] = []
        for r in self.prefilling:  # chunks of prompts already admitted come first
            if budget <= 0:
                break
            count = min(r.fill_len - r.prefilled, budget)
            chunks.append((r, r.prefilled, count))
            budget -= count
        while budget > 0 and self.n_waiting:
            r = self._head()
            if not self._admit(r):
                if self._preempt_for(r):
                    continue
                break  # head of line: the queue waits for its head
            heapq.heappop(self._waiting)
            self.n_waiting -= 1
            count = min(r.fill_len - r.prefilled, budget)
            chunks.append((r, r.prefilled, count))
            budget -= count
        return chunks

    def _head(self) -> TorchRequest:
        heap = self._waiting
        while heap[0][2].state != WAITING:  # aborted while waiting
            heapq.heappop(heap)
        return heap[0][2]

    def _admit(self, r: TorchRequest) -> bool:
        config, cache = self.config, self.cache
        if self.running() >= config.max_running:
            return False
        fill_len = len(r.prompt) + len(r.output)
        limit = fill_len - 1  # the last token is always computed (its logits are needed)
        if r.input_logprob_start >= 0 and not r.admitted:
            # A cached token has no logits: prompt logprobs need the tokens before them.
            limit = min(limit, max(r.input_logprob_start - 1, 0))
        match = (cache.match_prefix(r.token_key(fill_len), namespace=r.cache_salt)
                 if cache is not None else None)
        matched = match.length if match is not None else 0
        swapped = r.swapped
        cached = min(matched, limit)
        restored = swapped.length - cached if swapped is not None else 0
        extend = fill_len - cached - restored
        if match is not None:
            cache.inc_lock_ref(match.node)  # type: ignore[union-attr]
        committed = self._prefill_pending + self.running() * config.admission_reserve_tokens
        own = min(r.max_new - len(r.output), config.admission_reserve_tokens)
        need = extend + restored + len(self.decoding) + (own + committed if self.running() else 0)
        if need > self._available():
            if match is not None:
                cache.dec_lock_ref(match.node)  # type: ignore[union-attr]
            return False
        r.slots = list(match.value[:cached]) if match is not None else []
        r.tree_len = cached
        r.lock_node = match.node if match is not None else None
        if swapped is not None:
            new = self._alloc(restored)
            self.pool.swap_in(new, swapped.host[:, cached:])
            r.slots += new
            r.swapped = None
            self.swap_ins += 1
        r.state = PREFILLING
        r.fill_len = fill_len
        r.prefilled = len(r.slots)
        self._prefill_pending += fill_len - r.prefilled
        self.prefilling.append(r)
        if not r.admitted:
            r.admitted = True
            r.cached_tokens = cached
            self.cache_hit_tokens += cached
            self.cache_query_tokens += len(r.prompt)
        else:
            self.recomputed_tokens += max(0, min(fill_len, r.computed) - r.prefilled)
        return True

    def _preempt_for(self, r: TorchRequest) -> bool:
        if not self.config.priority_preemption or not self.decoding:
            return False
        victim = self._retraction_victim()
        if victim.priority <= r.priority:
            return False
        self._retract(victim)
        return True

    # ------------------------------------------------------------ the forward batch

    def _build(self, chunks: list[tuple[TorchRequest, int, int]]) -> StepPlan:
        ids: list[int] = []
        positions: list[int] = []
        out_slots: list[int] = []
        decode = self._decode_order()
        for r in decode:
            slot = self._alloc(1)[0]
            position = len(r.slots)
            r.slots.append(slot)
            ids.append(r.output[-1] if r.output else r.prompt[-1])
            positions.append(position)
            out_slots.append(slot)
        groups = self._decode_groups(decode)
        sample: list[TorchRequest] = list(decode)
        logit_rows: list[int] = list(range(len(decode)))
        extends: list[ExtendSegment] = []
        planned: list[tuple[TorchRequest, int, int]] = []
        prompt_lps: list[tuple[TorchRequest, int, int]] = []
        lp_rows: list[int] = []
        targets: list[int] = []
        for r, start, count in chunks:
            try:
                new = self._alloc(count)
            except RuntimeError:
                break  # no room this step; the chunk waits (decode goes on)
            self._prefill_pending -= count
            r.slots += new
            tokens = r.tokens()
            row0 = len(ids)
            ids += tokens[start : start + count]
            positions += range(start, start + count)
            out_slots += new
            extends.append(
                ExtendSegment(row0, count, start, torch.tensor(r.slots, dtype=torch.long))
            )
            planned.append((r, start, count))
            self._plan_prompt_logprobs(r, start, count, row0, lp_rows, prompt_lps, targets)
            if start + count == r.fill_len and len(r.output) < r.max_new:
                sample.append(r)  # its first (or next) token comes from its last row
                logit_rows.append(row0 + count - 1)
        logit_rows += lp_rows
        batch = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long),
            positions=torch.tensor(positions, dtype=torch.long),
            out_slots=torch.tensor(out_slots, dtype=torch.long),
            decode_groups=groups,
            extends=extends,
            logit_rows=torch.tensor(logit_rows, dtype=torch.long),
        )
        return StepPlan(batch, planned, sample, prompt_lps, torch.tensor(targets, dtype=torch.long))

    def _plan_prompt_logprobs(
        self,
        r: TorchRequest,
        start: int,
        count: int,
        row0: int,
        lp_rows: list[int],
        prompt_lps: list[tuple[TorchRequest, int, int]],
        targets: list[int],
    ) -> None:
        """Rows whose logits score the next prompt token, from `input_logprob_start` on."""
        first = r.input_logprob_start
        if first < 0 or r.output:  # none asked, or computed before a retraction
            return
        # Row at position p scores the token at p + 1 (a prompt token, p + 1 >= first).
        lo = max(start, first - 1, 0)
        hi = min(start + count, len(r.prompt) - 1)
        if hi <= lo:
            return
        prompt_lps.append((r, lo + 1, hi - lo))
        lp_rows.extend(range(row0 + lo - start, row0 + hi - start))
        targets.extend(r.prompt[lo + 1 : hi + 1])

    def _decode_order(self) -> list[TorchRequest]:
        """Decoding requests, those sharing a first slot (a cached prefix) adjacent."""
        if self.config.cascade_min_prefix <= 0:
            return list(self.decoding)
        return sorted(self.decoding, key=lambda r: r.slots[0] if r.slots else -1)

    def _decode_groups(self, decode: list[TorchRequest]) -> list[DecodeGroup]:
        groups: list[DecodeGroup] = []
        min_prefix = self.config.cascade_min_prefix
        i = 0
        while i < len(decode):
            j = i + 1
            head = decode[i].slots
            while j < len(decode) and decode[j].slots[0] == head[0]:
                j += 1
            shared = _common_prefix(decode[i:j]) if min_prefix > 0 and j - i > 1 else 0
            groups.append(_group(decode[i:j], i, shared if shared >= min_prefix else 0))
            i = j
        return _merge_plain(groups)

    # ----------------------------------------------------------------- results

    def commit(
        self, plan: StepPlan, out: StepOutput
    ) -> tuple[list[TokenEvent], list[TorchRequest]]:
        """Apply a step's results: the sampled tokens of live requests, and the requests
        that finished without sampling (prefill only)."""
        finished: list[TorchRequest] = []
        for r, start, count in plan.extends:
            if r.state != PREFILLING:
                continue  # aborted meanwhile
            r.prefilled = start + count
            if r.prefilled >= r.fill_len:
                self._prefill_done(r)
                if r.state == DONE:
                    finished.append(r)
        offset = 0
        for r, position, count in plan.prompt_logprobs:
            values = out.prompt_logprobs[offset : offset + count]
            offset += count
            for i, value in enumerate(values):
                r.input_logprobs[position + i] = value
        events: list[TokenEvent] = []
        for r, token, logprob in zip(plan.sample, out.tokens, out.logprobs, strict=True):
            if r.state != DECODING:
                continue
            r.output.append(token)
            r.output_logprobs.append(logprob)
            events.append(TokenEvent(r, token, logprob))
        return events, finished

    def _prefill_done(self, r: TorchRequest) -> None:
        self.prefilling.remove(r)
        r.computed = max(r.computed, r.fill_len)
        self._cache_prefix(r, r.fill_len)
        r.state = DECODING
        self.decoding[r] = None
        if r.max_new == 0:  # prefill only (select's first call)
            self.finish(r, FinishReason(FinishType.LENGTH, length=0))


def _common_prefix(requests: list[TorchRequest]) -> int:
    """Leading slots all `requests` share (a shared cached prefix), before their new token."""
    first = requests[0].slots
    shared = min(len(r.slots) - 1 for r in requests)
    for r in requests[1:]:
        slots = r.slots
        n = 0
        while n < shared and slots[n] == first[n]:
            n += 1
        shared = n
    return shared


def _csr(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = [0]
    flat: list[int] = []
    for slots in lists:
        flat += slots
        indptr.append(len(flat))
    return torch.tensor(indptr, dtype=torch.long), torch.tensor(flat, dtype=torch.long)


def _group(requests: list[TorchRequest], start: int, shared: int) -> DecodeGroup:
    indptr, indices = _csr([r.slots[shared:] for r in requests])
    prefix = torch.tensor(requests[0].slots[:shared], dtype=torch.long) if shared else None
    return DecodeGroup(start, start + len(requests), indptr, indices, prefix)


def _merge_plain(groups: list[DecodeGroup]) -> list[DecodeGroup]:
    """Adjacent groups without a shared prefix run as one paged-attention call."""
    merged: list[DecodeGroup] = []
    for g in groups:
        last = merged[-1] if merged else None
        if last is not None and last.prefix_indices is None and g.prefix_indices is None:
            offset = last.indptr[-1]
            last.indptr = torch.cat([last.indptr, g.indptr[1:] + offset])
            last.indices = torch.cat([last.indices, g.indices])
            last.end = g.end
        else:
            merged.append(g)
    return merged


StepRunner = Callable[[StepPlan], StepOutput]

"""Replica routing: which engine replica runs a call.

Each replica has an approximate index of the prompts routed to it (`Replica.tree`, a
`PrefixIndex`: `scheduler/replica.py`), which estimates the cache hit a call would get
there. The indexes are namespaced by the program's cache salt, as the engines'
caches are, so a call is never routed towards another tenant's prefix. The `affinity` balance (Autellix, and the SGLang router's cache-aware mode):

- a long-context call (prompt >= `long_context_tokens`) stays on its program's replica,
  waiting for room there: moving it would re-prefill the whole context;
- a short call goes to its program's replica when at least `cache_match_fraction` of its
  prompt is cached there, and waits for room there too, unless that replica's backlog
  (calls in flight or waiting for it) exceeds the least-loaded one's by more than
  `balance_abs_threshold` (default: one in-flight budget); otherwise to another replica
  that caches that share, or to the least-loaded one.

Waiting for the program's replica departs from Autellix's least-loaded routing of short
calls: on the sim engine an agent's "short" calls (bfcl's ~735-2,000-token prompts, LATS
value calls, chat turns) re-prefilled elsewhere cost more than the wait: on mixed, waiting
raised the cache hit rate, lowered the token latency and moved every policy's knee up
(figures and the run: docs/architecture.md, Scheduler, Router).

`cache_aware` is the SGLang router's rule (sgl-router's `cache_aware` policy, with its
defaults in `sglang_router` `RouterArgs`: `cache_threshold` 0.5, `balance_abs_threshold`
32, `balance_rel_threshold` 1.0001; the bench's `engine` baseline sets the first two
through `cache_match_fraction` and `balance_abs_threshold`): an approximate prefix tree
per worker, into which every request's prompt is inserted when it is routed; if the
workers' loads (requests in flight) are imbalanced, i.e. max - min > abs threshold *and*
max > rel threshold * min, the least-loaded worker; otherwise the worker whose tree
matches the largest share of the prompt if that share exceeds the cache threshold, else
the worker with the smallest tree (the most room for new prefixes). No program state: a
router in front of engines knows requests, not programs. Here the tree also learns each
call's output when it finishes (what the engine caches), which only helps it.

`round_robin` and `least_loaded` are the baselines. Every balance places calls only on
replicas with room in their in-flight budget (`affinity` may park one for its home).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .replica import Replica, RouteKey, prompt_key, with_output

if TYPE_CHECKING:
    from .config import SchedulerConfig
    from .program import CallNode


@dataclass(slots=True)
class RouteDecision:
    replica: Replica | None  # None: no replica can take the call now
    wait_for_home: bool = False  # park the call on `replica` until it has room
    estimated_hit: int = 0  # tokens


# sglang_router's default `balance_rel_threshold` (RouterArgs): with it, any difference in
# load above the absolute threshold counts as imbalance.
CACHE_AWARE_REL_THRESHOLD = 1.0001


class Router:
    def __init__(self, config: SchedulerConfig, replicas: Sequence[Replica]) -> None:
        self.config = config
        self.replicas = list(replicas)
        self.balance = config.balance
        self._next = 0
        self.long_context = config.long_context_tokens
        self.max_imbalance = (config.balance_abs_threshold
                              if config.balance_abs_threshold is not None
                              else config.max_inflight_requests)
        # The trees serve two readers: the choice among several replicas, and a policy
        # that ranks by cached prefix (`track_prefixes`). With neither, keeping them costs
        # every call a radix insert for nothing (the common single-engine proxy set-up).
        self.tracks_prefixes = len(self.replicas) > 1

    def track_prefixes(self) -> None:
        """A policy reads `best_match`: keep the trees even with one replica."""
        self.tracks_prefixes = True

    # ------------------------------------------------------------------ keys and hints
    def route_key(self, call: CallNode) -> tuple[RouteKey | None, float]:
        """The call's prompt encoded for the trees (once per call), and the tokens each
        key element stands for."""
        key = call.route_key
        if key is None:
            request = call.request
            if request is None:
                return None, 1.0
            key, call.route_scale = prompt_key(request, self.config)
            call.route_key = key
        return key, call.route_scale

    def best_match(self, call: CallNode) -> int:
        """Tokens of the call's prompt cached on its best replica (DLPM's hint)."""
        key, scale = self.route_key(call)
        if not key:
            return 0
        salt = call.program.cache_salt
        return int(max(r.tree.match(key, salt) for r in self.replicas) * scale)

    # ------------------------------------------------------------------------- choice
    def choose(self, call: CallNode) -> RouteDecision:
        replicas = self.replicas
        if len(replicas) == 1:
            only = replicas[0]
            return RouteDecision(only if only.has_room(call) else None)
        balance = self.balance
        if balance == "round_robin":
            return RouteDecision(self._round_robin(call))
        if balance == "least_loaded":
            return RouteDecision(self._least_loaded(call))
        if balance == "cache_aware":
            return self._cache_aware(call)
        return self._affinity(call)

    def _round_robin(self, call: CallNode) -> Replica | None:
        n = len(self.replicas)
        for i in range(n):
            replica = self.replicas[(self._next + i) % n]
            if replica.has_room(call):
                self._next = (self._next + i + 1) % n
                return replica
        return None

    def _least_loaded(self, call: CallNode) -> Replica | None:
        best: Replica | None = None
        for replica in self.replicas:
            if replica.has_room(call) and (
                best is None or replica.load_key() < best.load_key()
            ):
                best = replica
        return best

    def _least_backlog(self, call: CallNode) -> Replica | None:
        best: Replica | None = None
        best_key: tuple[int, int, int] | None = None
        for replica in self.replicas:
            if not replica.has_room(call):
                continue
            key = (replica.backlog(), replica.inflight_tokens, replica.index)
            if best_key is None or key < best_key:
                best, best_key = replica, key
        return best

    def _cache_aware(self, call: CallNode) -> RouteDecision:
        """The SGLang router's cache-aware rule (module docstring)."""
        candidates = [r for r in self.replicas if r.has_room(call)]
        if not candidates:
            return RouteDecision(None)
        least = min(candidates, key=Replica.load_key)
        most = max(r.inflight_requests for r in candidates)
        low = least.inflight_requests
        if most - low > self.max_imbalance and most > CACHE_AWARE_REL_THRESHOLD * low:
            return RouteDecision(least)
        key, scale = self.route_key(call)
        if key is None or not len(key):
            return RouteDecision(least)
        salt = call.program.cache_salt
        best, best_hit = candidates[0], -1
        for replica in candidates:
            hit = replica.tree.match(key, salt)
            if hit > best_hit:
                best, best_hit = replica, hit
        if best_hit / len(key) > self.config.cache_match_fraction:
            return RouteDecision(best, estimated_hit=int(best_hit * scale))
        return RouteDecision(min(candidates, key=lambda r: (r.tree.size(), r.index)))

    def _affinity(self, call: CallNode) -> RouteDecision:
        program = call.program
        home_index = program.home_replica
        home = self.replicas[home_index] if home_index >= 0 else None
        if home is not None and not home.healthy:
            home = None  # down (replica_health.py): never wait on it, nor prefer it
        if home is not None and call.prompt_len >= self.long_context:
            if home.has_room(call):
                return RouteDecision(home)
            return RouteDecision(home, wait_for_home=True)
        key, scale = self.route_key(call)
        least: Replica | None = None
        for replica in self.replicas:
            if replica.has_room(call) and (least is None or replica.load_key() < least.load_key()):
                least = replica
        if least is None:
            return RouteDecision(None)
        if key is None or not len(key):
            return RouteDecision(least)
        if home is None and call.prompt_len >= self.long_context:
            # A long-context program's first call places the program: every later call
            # stays there. Place it by load (calls in flight and parked), not by the
            # shared prefix its prompt starts with, or every program that shares a
            # system prompt piles onto the replica that cached it first.
            return RouteDecision(self._least_backlog(call) or least)
        threshold = self.config.cache_match_fraction * call.prompt_len
        max_imbalance = self.max_imbalance
        floor = least.inflight_requests
        # The program's home usually holds its prefix: try it before searching every tree.
        if home is not None:
            hit = int(home.tree.match(key, program.cache_salt) * scale)
            if hit >= threshold and hit > 0:
                if home.has_room(call):
                    if home.inflight_requests - floor <= max_imbalance:
                        return RouteDecision(home, estimated_hit=hit)
                elif home.backlog() - least.backlog() <= max_imbalance:
                    # Full: wait there rather than re-prefill the prefix elsewhere, unless
                    # its backlog is that much longer than the least-loaded replica's.
                    return RouteDecision(home, wait_for_home=True, estimated_hit=hit)
        best: Replica | None = None
        best_hit = 0
        for replica in self.replicas:
            if replica is home or not replica.has_room(call):
                continue
            if replica.inflight_requests - floor > max_imbalance:
                continue
            hit = replica.tree.match(key, program.cache_salt)
            if hit > best_hit:
                best, best_hit = replica, hit
        hit_tokens = int(best_hit * scale)
        if best is not None and hit_tokens > 0 and hit_tokens >= threshold:
            return RouteDecision(best, estimated_hit=hit_tokens)
        return RouteDecision(least)

    # -------------------------------------------------------------------- bookkeeping
    def on_dispatch(self, call: CallNode, replica: Replica) -> None:
        """The program's later calls prefer this replica (its prefix will be cached here).
        `cache_aware` inserts the prompt into the replica's tree now, as SGLang's router
        does when it routes a request."""
        call.program.home_replica = replica.index
        if self.balance == "cache_aware" and self.tracks_prefixes:
            key, _ = self.route_key(call)
            if key is not None:
                replica.tree.insert(key, call.program.cache_salt)

    def on_finish(self, call: CallNode, replica: Replica, output_ids: list[int] | None) -> None:
        """The replica now caches the prompt (and the output, for token-id prompts).
        Recorded once, at the end: a concurrent sibling still finds the shared prefix
        through the program's home and the earlier calls' entries."""
        if not self.tracks_prefixes:
            return
        key, _ = self.route_key(call)
        if key is None:
            return
        request = call.request
        if output_ids and request is not None and request.input_ids is not None:
            key = with_output(key, request, output_ids, self.config.router_token_stride)
        replica.tree.insert(key, call.program.cache_salt)

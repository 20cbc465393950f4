"""Replica routing: affinity for long contexts, cache-aware for short calls, baselines."""

from __future__ import annotations

import itertools

from sched_fake_engine import FakeEngine

from engine_backend.types import GenerateRequest
from scheduler.config import SchedulerConfig
from scheduler.policies import make_policy
from scheduler.program import CallNode, Program
from scheduler.replica import make_replicas
from scheduler.router import Router

_seq = itertools.count()


def setup(n: int = 3, **config):
    cfg = SchedulerConfig(**config)
    replicas = make_replicas([FakeEngine() for _ in range(n)], cfg)
    router = Router(cfg, replicas)
    make_policy(cfg, router)  # a policy that ranks by cached prefix makes it keep its trees
    return router, replicas


def call_for(program: Program, tokens: list[int]) -> CallNode:
    c = CallNode(id=f"c{next(_seq)}", program=program, kind="llm", seq=next(_seq), created_at=0)
    c.request = GenerateRequest(rid=c.id, input_ids=tokens)
    c.prompt_len = len(tokens)
    c.budget_tokens = len(tokens) + 16
    return c


def occupy(replica, n: int) -> None:
    for _ in range(n):
        dummy = call_for(Program(id="x", tenant="t", arrival=0, seq=0), [1])
        replica.running.add(dummy)
        replica.inflight_requests += 1


def finish_on(router: Router, replica, call: CallNode) -> None:
    router.on_dispatch(call, replica)
    router.on_finish(call, replica, [])


def test_short_call_goes_where_its_prefix_is_cached():
    router, replicas = setup()
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    system = list(range(1000, 1400))
    finish_on(router, replicas[2], call_for(prog, system))
    other = Program(id="q", tenant="t", arrival=0, seq=1)
    decision = router.choose(call_for(other, system + [7, 8, 9]))
    assert decision.replica is replicas[2]
    assert decision.estimated_hit == 400


def test_short_call_without_a_hit_goes_to_the_least_loaded():
    router, replicas = setup()
    occupy(replicas[0], 3)
    occupy(replicas[1], 1)
    occupy(replicas[2], 2)
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    assert router.choose(call_for(prog, [5, 6, 7])).replica is replicas[1]


def test_load_beats_cache_past_the_imbalance_threshold():
    router, replicas = setup(balance_abs_threshold=4)
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    prefix = list(range(50, 450))
    finish_on(router, replicas[0], call_for(prog, prefix))
    occupy(replicas[0], 10)
    decision = router.choose(call_for(Program(id="q", tenant="t", arrival=0, seq=1), prefix))
    assert decision.replica is not replicas[0]


def test_short_call_waits_for_its_full_home_rather_than_re_prefill_elsewhere():
    router, replicas = setup(max_inflight_requests=4)
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    context = list(range(500, 900))  # short: below long_context_tokens
    finish_on(router, replicas[1], call_for(prog, context))
    occupy(replicas[1], 4)  # full
    decision = router.choose(call_for(prog, context + [1, 2]))
    assert decision.replica is replicas[1] and decision.wait_for_home
    assert decision.estimated_hit == 400
    # A prompt mostly not cached there is not worth the wait: least-loaded.
    other = router.choose(call_for(prog, context[:40] + list(range(5000, 5400))))
    assert other.replica is not replicas[1] and not other.wait_for_home


def test_a_home_backlog_past_one_budget_sends_short_calls_elsewhere():
    router, replicas = setup(max_inflight_requests=4)
    assert router.max_imbalance == 4  # default: one in-flight budget
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    context = list(range(500, 900))
    finish_on(router, replicas[1], call_for(prog, context))
    occupy(replicas[1], 4)
    for _ in range(4):  # backlog 4 in flight + 4 parked vs 0: more than one budget
        parked = call_for(Program(id="z", tenant="t", arrival=0, seq=2), [3])
        replicas[1].parked.push(parked, (parked.seq,))
    decision = router.choose(call_for(prog, context + [1, 2]))
    assert decision.replica is not replicas[1] and not decision.wait_for_home


def test_long_context_stays_home_and_waits_when_home_is_full():
    router, replicas = setup(long_context_tokens=100, max_inflight_requests=2)
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    context = list(range(300))
    finish_on(router, replicas[1], call_for(prog, context))
    assert prog.home_replica == 1
    occupy(replicas[1], 1)  # busier than the others, still room
    assert router.choose(call_for(prog, context + [1, 2])).replica is replicas[1]
    occupy(replicas[1], 1)  # full
    decision = router.choose(call_for(prog, context + [1, 2]))
    assert decision.replica is replicas[1] and decision.wait_for_home


def test_round_robin_and_least_loaded_baselines():
    router, replicas = setup(balance="round_robin")
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    picks = [router.choose(call_for(prog, [1, 2])).replica.index for _ in range(6)]
    assert picks == [0, 1, 2, 0, 1, 2]
    router, replicas = setup(balance="least_loaded")
    occupy(replicas[0], 2)
    occupy(replicas[2], 1)
    assert router.choose(call_for(prog, [1])).replica is replicas[1]


def test_text_prompts_are_routed_by_cached_prefix_too():
    router, replicas = setup()
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    system = "You are a helpful assistant. " * 40
    first = call_for(prog, [1])
    first.request = GenerateRequest(rid="a", text=system + "first question")
    first.prompt_len = len(first.request.text) // 4
    finish_on(router, replicas[2], first)
    second = call_for(Program(id="q", tenant="t", arrival=0, seq=1), [1])
    second.request = GenerateRequest(rid="b", text=system + "another one")
    second.prompt_len = len(second.request.text) // 4
    assert router.choose(second).replica is replicas[2]


def test_prefix_trees_stay_bounded():
    router, replicas = setup(router_tree_tokens=1000)
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    for i in range(20):
        finish_on(router, replicas[0], call_for(prog, list(range(i * 500, i * 500 + 300))))
    assert replicas[0].tree.tree.total_size() <= 1000 // 16  # sampled key elements


def test_trees_are_kept_only_where_they_can_change_a_decision():
    prog = Program(id="p", tenant="t", arrival=0, seq=0)
    tokens = list(range(500, 900))
    lone, (replica,) = setup(n=1)
    finish_on(lone, replica, call_for(prog, tokens))
    assert lone.best_match(call_for(prog, tokens)) == 0  # one replica, no hint reader
    dlpm, (replica,) = setup(n=1, policy="dlpm")
    finish_on(dlpm, replica, call_for(prog, tokens))
    assert dlpm.best_match(call_for(prog, tokens)) == 400  # DLPM reads the hint
    many, replicas = setup(n=2)
    finish_on(many, replicas[1], call_for(prog, tokens))
    assert many.best_match(call_for(prog, tokens)) == 400

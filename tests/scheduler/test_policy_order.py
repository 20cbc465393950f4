"""Every policy's ordering on hand-made cases (no engine involved)."""

from __future__ import annotations

import itertools

import pytest

from scheduler.config import SchedulerConfig
from scheduler.policies import make_policy
from scheduler.program import CallNode, Program

_seq = itertools.count()


def program(pid: str, *, service: float = 0.0, wait: float = 0.0, tenant: str = "t") -> Program:
    p = Program(id=pid, tenant=tenant, arrival=0.0, seq=next(_seq))
    p.history.service = service
    p.history.wait_wall_s = wait
    return p


def call(prog: Program, cid: str, *, parents: tuple[str, ...] = (), prompt_len: int = 10) -> CallNode:
    c = CallNode(id=cid, program=prog, kind="llm", seq=next(_seq), created_at=0.0, parents=parents)
    c.prompt_len = prompt_len
    c.budget_tokens = prompt_len + 16
    prog.calls[cid] = c
    return c


def drain(policy, now: float = 0.0) -> list[str]:
    out = []
    while (c := policy.pop(now)) is not None:
        out.append(c.id)
    return out


def cfg(policy: str, **kw) -> SchedulerConfig:
    return SchedulerConfig(policy=policy, **kw)


class Hints:
    """A stand-in for the router's prefix hints."""

    def __init__(self, best_match) -> None:
        self.best_match = best_match
        self.tracking = False

    def track_prefixes(self) -> None:
        self.tracking = True


def push(policy, c: CallNode, now: float = 0.0) -> None:
    c.queued_at = now
    c.program.queued.add(c)
    policy.push(c, now)


def test_fcfs_is_call_arrival_order():
    pol = make_policy(cfg("fcfs"))
    heavy, light = program("heavy", service=100.0), program("light")
    a, b, c = call(heavy, "a"), call(light, "b"), call(heavy, "c")
    for x in (a, b, c):
        push(pol, x)
    assert drain(pol) == ["a", "b", "c"]


def test_plas_runs_least_attained_program_first():
    pol = make_policy(cfg("plas"))
    heavy, mid, light = program("heavy", service=50.0), program("mid", service=3.0), program("light")
    order = [call(heavy, "h"), call(mid, "m"), call(light, "l")]
    for x in order:
        push(pol, x, now=0.0)
    assert drain(pol, now=0.0) == ["l", "m", "h"]


def test_plas_same_queue_is_fcfs_by_program_arrival():
    pol = make_policy(cfg("plas", mlfq_first_bound=1.0, mlfq_growth=2.0))
    older, newer = program("older", service=0.5), program("newer", service=0.1)
    # both below the first bound: same queue, so the older program goes first
    push(pol, call(newer, "n"))
    push(pol, call(older, "o"))
    assert drain(pol) == ["o", "n"]


def test_plas_reranks_queued_calls_when_program_service_grows():
    pol = make_policy(cfg("plas"))
    a, b = program("a"), program("b", service=1.0)
    a1, a2 = call(a, "a1"), call(a, "a2")
    b1 = call(b, "b1")
    for x in (a1, a2, b1):
        push(pol, x)
    assert pol.pop(0.0).id == "a1"
    a.queued.discard(a1)
    # a1 finished with a lot of service: a's queued a2 now ranks behind b1
    a1.service = 40.0
    a.history.service = 40.0
    pol.on_call_finished(a1, 0.0)
    assert drain(pol) == ["b1", "a2"]


def test_atlas_ranks_by_critical_path_service():
    pol = make_policy(cfg("atlas"))
    p = program("dag", service=10.1)
    root = call(p, "root")
    root.priority, root.service = 0.0, 10.0
    cheap = call(p, "cheap")
    cheap.priority, cheap.service = 0.0, 0.1
    after_root = call(p, "after_root", parents=("root",))
    after_cheap = call(p, "after_cheap", parents=("cheap",))
    join = call(p, "join", parents=("root", "cheap"))
    for x in (after_root, after_cheap, join):
        push(pol, x)
    assert after_root.priority == pytest.approx(10.0)
    assert after_cheap.priority == pytest.approx(0.1)
    assert join.priority == pytest.approx(10.0)  # max over parents
    first = drain(pol)
    assert first[0] == "after_cheap"
    assert set(first[1:]) == {"after_root", "join"}


def test_atlas_differs_from_plas_on_parallel_threads():
    """A program whose other thread used a lot of service: PLAS demotes the fresh thread,
    ATLAS does not (its critical path is short)."""
    p = program("multi", service=100.0)
    other = program("other", service=5.0)
    for name, expected in (("plas", ["o", "fresh"]), ("atlas", ["fresh", "o"])):
        pol = make_policy(cfg(name))
        fresh = call(p, f"fresh-{name}")
        fresh.id = "fresh"
        o = call(other, f"o-{name}", parents=())
        o.id = "o"
        o.priority = 0.0
        other_parent = call(other, f"op-{name}")
        other_parent.service = 5.0
        o.parents = (other_parent.id,)
        push(pol, fresh)
        push(pol, o)
        assert drain(pol) == expected, name


def test_plain_mlfq_ignores_program_history():
    pol = make_policy(cfg("mlfq"))
    heavy, light = program("heavy", service=1e4), program("light")
    push(pol, call(heavy, "h"))
    push(pol, call(light, "l"))
    assert drain(pol) == ["h", "l"]  # both fresh calls: top queue, FCFS


def test_plain_mlfq_demotes_a_call_by_its_own_service():
    pol = make_policy(cfg("mlfq", mlfq_first_bound=0.25))
    p, q = program("p"), program("q")
    resumed = call(p, "resumed")
    resumed.service = 5.0  # ran before being preempted
    fresh = call(q, "fresh")
    push(pol, resumed)
    push(pol, fresh)
    assert drain(pol) == ["fresh", "resumed"]


def test_geometric_levels_and_quantum():
    pol = make_policy(cfg("plas", mlfq_queues=4, mlfq_first_bound=1.0, mlfq_growth=2.0,
                          mlfq_quantum=0.5))
    assert [pol.level_of(x) for x in (0, 0.99, 1.0, 1.99, 2.0, 3.9, 4.0, 1e9)] == [
        0, 0, 1, 1, 2, 2, 3, 3]
    c = call(program("x"), "c")
    c.level = 0
    assert pol.level_after_running(c, 0.4) == 0
    assert pol.level_after_running(c, 0.6) == 1  # past quantum 0.5
    assert pol.level_after_running(c, 0.5 + 1.0 + 0.1) == 2  # quanta 0.5, 1.0, 2.0 ...
    assert pol.level_after_running(c, 1e9) == 3


def test_anti_starvation_promotes_a_long_waiting_program():
    """beta=2: a program with 10 s of service is promoted once it waited 20 s in total."""
    pol = make_policy(cfg("plas", starvation_beta=2.0))
    long_prog = program("long", service=10.0, wait=5.0)
    starving = call(long_prog, "starving")
    push(pol, starving, now=0.0)
    assert starving.level > 0
    # a flood of fresh short programs keeps arriving
    shorts = []
    for i in range(20):
        s = call(program(f"s{i}"), f"s{i}")
        push(pol, s, now=float(i))
        shorts.append(s)
    assert pol.pop(14.0).id == "s0"  # not yet: 5 + 14 < 2 * 10
    got = pol.pop(15.0)  # 5 + 15 >= 20: promoted to the top queue
    assert got.id == "starving"
    assert pol.promotions == 1


def test_promotion_of_fresh_program_is_immediate_and_harmless():
    pol = make_policy(cfg("atlas"))
    p = program("new")
    c = call(p, "c")
    push(pol, c)
    assert c.level == 0


def test_dlpm_prefers_longest_prefix_within_a_tenant():
    hints = {}
    pol = make_policy(cfg("dlpm", dlpm_quantum_tokens=10_000), Hints(lambda c: hints[c.id]))
    p = program("p", tenant="a")
    for cid, hint in (("short", 5), ("long", 500), ("mid", 50)):
        hints[cid] = hint
        push(pol, call(p, cid, prompt_len=600))
    assert drain(pol) == ["long", "mid", "short"]


def test_dlpm_deficit_round_robin_is_fair_across_tenants():
    pol = make_policy(cfg("dlpm", dlpm_quantum_tokens=100, decode_reserve_tokens=0),
                      Hints(lambda c: 0))
    flood, quiet = program("f", tenant="flood"), program("q", tenant="quiet")
    for i in range(30):
        push(pol, call(flood, f"f{i}", prompt_len=50))
    for i in range(3):
        push(pol, call(quiet, f"q{i}", prompt_len=50))
    order = drain(pol)
    # the quiet tenant's 3 calls all run within the first 8 dispatches, not after 30
    positions = [order.index(f"q{i}") for i in range(3)]
    assert max(positions) < 8, order
    assert len(order) == 33


def test_remove_and_requeue_keep_queue_consistent():
    pol = make_policy(cfg("plas"))
    p = program("p")
    a, b, c = call(p, "a"), call(p, "b"), call(p, "c")
    for x in (a, b, c):
        push(pol, x)
    pol.remove(b)
    first = pol.pop(0.0)
    pol.requeue(first, 0.0)
    assert len(pol) == 2
    assert drain(pol) == ["a", "c"]


def test_urgent_calls_go_first_within_a_queue_but_fcfs_ignores_them():
    from scheduler.program import mark_urgent

    for name, expected in (("plas", ["u", "a"]), ("atlas", ["u", "a"]), ("fcfs", ["a", "u"])):
        pol = make_policy(cfg(name))
        prog = program(f"p-{name}")
        plain, critical = call(prog, "a"), call(prog, "u")
        assert mark_urgent(critical) == [critical]
        push(pol, plain)
        push(pol, critical)
        assert drain(pol) == expected, name


def test_urgency_propagates_to_the_calls_a_critical_call_waits_on():
    from scheduler.program import mark_urgent

    prog = program("dag")
    root, side = call(prog, "root"), call(prog, "side")
    mid = call(prog, "mid", parents=("root",))
    leaf = call(prog, "leaf", parents=("mid",))
    assert {c.id for c in mark_urgent(leaf)} == {"leaf", "mid", "root"}
    assert root.urgent and mid.urgent and not side.urgent
    assert mark_urgent(leaf) == []  # already marked


def test_fcfs_can_use_anti_starvation():
    """Off by default (plain arrival order); on, a call whose wait reaches beta times its
    program's service goes ahead of the calls that are not starving."""
    for enabled, expected in ((None, ["g", "h"]), (True, ["h", "g"])):
        pol = make_policy(cfg("fcfs", anti_starvation=enabled, starvation_beta=2.0))
        big, small = program("big", service=100.0), program("small", service=10.0)
        push(pol, call(big, "g"), now=0.0)
        push(pol, call(small, "h"), now=0.0)
        assert drain(pol, now=25.0) == expected  # small: 25 >= 2 * 10; big: not yet
        assert pol.promotions == (1 if enabled else 0)


def test_dlpm_can_use_anti_starvation():
    """Longest prefix first starves a short-prefix call; with anti-starvation it goes
    first in its tenant once its wait reaches beta times its program's service."""
    hints = {"short": 5, "long1": 500, "long2": 500}
    for enabled, first in ((None, "long1"), (True, "short")):
        pol = make_policy(cfg("dlpm", anti_starvation=enabled, starvation_beta=2.0),
                          Hints(lambda c: hints[c.id]))
        mine, heavy = program("mine", service=10.0), program("heavy", service=1000.0)
        push(pol, call(mine, "short", prompt_len=600), now=0.0)
        push(pol, call(heavy, "long1", prompt_len=600), now=0.0)
        push(pol, call(heavy, "long2", prompt_len=600), now=0.0)
        assert pol.pop(1.0).id == "long1"  # nobody starves yet
        assert pol.pop(25.0).id == ("long2" if first == "long1" else "short")


def test_a_deadline_moves_with_the_programs_service():
    """The promotion deadline is re-read when it passes: service the program got since
    (another call finished) moves it on, as the formula says."""
    pol = make_policy(cfg("plas", starvation_beta=2.0))
    p = program("p", service=10.0)
    waiting = call(p, "waiting")
    push(pol, waiting, now=0.0)  # level > 0; due at 2 * 10 = 20
    p.history.service = 20.0  # another of its calls finished: due at 2 * 20 = 40
    pol.on_call_finished(call(p, "done"), 15.0)
    fresh = [call(program(f"f{i}"), f"f{i}") for i in range(2)]
    push(pol, fresh[0], now=25.0)
    assert pol.pop(25.0).id == "f0"  # not promoted at 25
    push(pol, fresh[1], now=41.0)
    assert pol.pop(41.0).id == "waiting"  # promoted at 41 >= 40
    assert pol.promotions == 1


def test_plas_reranks_a_queued_call_when_it_reaches_the_head():
    """Many queued calls of one program: finishing calls does not touch them; each is
    re-ranked (and moved down) only when it reaches the head."""
    pol = make_policy(cfg("plas", anti_starvation=False))
    p, q = program("p"), program("q", service=3.0)
    mine = [call(p, f"p{i}") for i in range(50)]
    for c in mine:
        push(pol, c)
    other = call(q, "q0")
    push(pol, other)
    order = []
    while len(pol):
        c = pol.pop(0.0)
        order.append(c.id)
        p.queued.discard(c)
        p.history.service += 0.25  # each finished call adds service
        pol.on_call_finished(c, 0.0)
    # q (3.0 s) is in queue 3, [2, 4) s; p's queued calls stay ahead while p's service
    # is below 4 s (same queue: the older program first), i.e. for 16 finishes
    assert order[:16] == [f"p{i}" for i in range(16)]
    assert order[16] == "q0"
    assert order[17:] == [f"p{i}" for i in range(16, 50)]


def test_every_registered_policy_keeps_the_contract_and_names_come_from_the_registry():
    import argparse
    import typing

    from progserve.bench import policies as bench
    from progserve.commands import serve
    from scheduler.policies import POLICY_NAMES, Policy, policy_levels

    for name in POLICY_NAMES:
        pol = make_policy(cfg(name), Hints(lambda c: 0))
        assert isinstance(pol, Policy), name
        assert pol.name == name and pol.levels == policy_levels(cfg(name))
    assert typing.get_args(SchedulerConfig.model_fields["policy"].annotation) == POLICY_NAMES
    parser = argparse.ArgumentParser()
    serve.configure(parser)
    assert tuple(next(a for a in parser._actions if a.dest == "policy").choices) == POLICY_NAMES
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    assert parser.parse_args([]).policies == ",".join(POLICY_NAMES)

"""A finished call's span is kept packed until read (`progserve/call_timeline.py`): what
it builds from must be exactly what it was given."""

from __future__ import annotations

import sys

from progserve.call_timeline import CallTimeline, PackedCallSpan


def echo(*args: object) -> tuple[object, ...]:
    return args


def timeline(**changes: object) -> CallTimeline:
    t = CallTimeline(key="t/p1", program_id="p1", call_id="c7", kind="llm", tenant="t",
                     queued_ns=1_765_000_000_123_456_789, thread_id="main",
                     parents=("c5", "c6"), replica=2, priority=0.25, queue_level=3,
                     queue_wait_s=0.5, ttft_s=None, preemptions=1)
    t.events += [("queued", t.queued_ns, None),
                 ("dispatched", t.queued_ns + 10, {"progserve.replica": 2}),
                 ("promoted", t.queued_ns + 20, {"progserve.policy.queue_level": 0}),
                 ("first_token", t.queued_ns + 30, None)]
    for name, value in changes.items():
        setattr(t, name, value)
    return t


def test_a_packed_span_builds_from_exactly_what_it_was_given() -> None:
    usage = (120, 64, 16, 0.75, None, 0.125, 1.5, None)
    original = timeline()
    packed = PackedCallSpan(echo, original, original.queued_ns + 99, "boom", usage,
                            "binding", 2**64 - 5)
    built_timeline, end_ns, error, built_usage, binding, span_id = packed()
    assert built_timeline == original
    assert (end_ns, error, built_usage, binding, span_id) == (
        original.queued_ns + 99, "boom", usage, "binding", 2**64 - 5)


def test_no_usage_no_replica_and_unusual_events_survive() -> None:
    odd = [("dispatched", 5, {"a": 1, "b": 2}), ("note", 6, {"text": "x"})]
    original = timeline(replica=None, ttft_s=0.0, events=odd, tool="search", kind="tool")
    built_timeline, *_, built_usage, _, _ = PackedCallSpan(echo, original, 7, None, None,
                                                           None, 1)()
    assert built_timeline == original and built_usage is None


def test_a_packed_span_is_smaller_than_what_it_replaces() -> None:
    original = timeline()
    packed = PackedCallSpan(echo, original, original.queued_ns + 99, None,
                            (120, 64, 16, 0.75, 0.5, 0.125, 1.5, 2), None, 12345)
    packed_size = sys.getsizeof(packed) + sys.getsizeof(packed.numbers) + \
        sys.getsizeof(packed.event_keys)
    as_was = sys.getsizeof(original) + sys.getsizeof(original.events) + sum(
        sys.getsizeof(e) + sys.getsizeof(e[1]) + (sys.getsizeof(e[2]) if e[2] else 0)
        for e in original.events)
    assert packed_size * 2 < as_was, (packed_size, as_was)

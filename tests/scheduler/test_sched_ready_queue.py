"""Property test: the lazy ready heap behaves like a sorted reference model under any mix
of pushes, re-keys, removals and pops."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.program import CallNode, Program
from scheduler.ready_queue import ReadyHeap

ops = st.lists(
    st.tuples(st.sampled_from(["push", "rekey", "remove", "pop"]), st.integers(0, 15),
              st.integers(0, 5)),
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_heap_matches_reference(sequence):
    program = Program(id="p", tenant="t", arrival=0.0, seq=0)
    calls = [CallNode(id=f"c{i}", program=program, kind="llm", seq=i, created_at=0.0)
             for i in range(16)]
    heap, other = ReadyHeap(), ReadyHeap("other")
    model: dict[int, tuple[int, int]] = {}  # call index -> key
    for op, i, k in sequence:
        call = calls[i]
        if op in ("push", "rekey"):
            heap.push(call, (k,))
            model[i] = (k, i)
        elif op == "remove":
            heap.remove(call)
            model.pop(i, None)
        else:
            got = heap.pop()
            if not model:
                assert got is None
            else:
                best = min(model, key=lambda j: model[j])
                assert got is calls[best]
                del model[best]
        assert len(heap) == len(model)
        # a call is in at most one heap: moving it elsewhere takes it out of this one
        if op == "push" and k == 5:
            other.push(call, (0,))
            model.pop(i, None)
            assert call.heap is other
            assert len(heap) == len(model)
            other.remove(call)
    drained = []
    while (c := heap.pop()) is not None:
        drained.append(c)
    assert [c.seq for c in drained] == sorted(model, key=lambda j: model[j])

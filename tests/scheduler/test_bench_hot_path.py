"""The shortcuts the policy bench's hot path takes around pydantic stay equivalent to
pydantic's own paths (issue 24.2)."""

from __future__ import annotations

from array import array

from engine_backend.radix_cache import KeyedTokens, TokenKey
from engine_backend.types import GenerateRequest, SamplingParams
from progserve.bench.driver import Client, Fresh, int64s, join
from scheduler.call_runner import _SET_IN_PLACE


def test_fields_set_in_place_are_plain_fields() -> None:
    """`engine_request` stores these in `__dict__` and marks them set, which is what
    pydantic's assignment does only without `validate_assignment`."""
    assert not GenerateRequest.model_config.get("validate_assignment")
    for name in _SET_IN_PLACE:
        assert name in GenerateRequest.model_fields


def test_driver_request_equals_model_copy() -> None:
    template = GenerateRequest(rid="template", input_ids=[0])
    client = Client.__new__(Client)
    client._template = template
    update = {"rid": "p/c", "input_ids": [5, 6], "sampling": SamplingParams(max_new_tokens=3),
              "program_id": "p"}
    fast = client._request(**update)
    slow = template.model_copy(update=update)
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set
    assert fast.model_dump(exclude_unset=True) == slow.model_dump(exclude_unset=True)
    fast.priority = 2.0  # a copy: the template is untouched
    assert template.priority == 0.0 and "priority" not in template.model_fields_set


def test_driver_prompts_are_int64_arrays_with_the_list_encoding() -> None:
    fresh = Fresh(10)
    output = KeyedTokens.with_key([7, 8], TokenKey([7, 8]))
    prompt = join(array("q", [1, 2]), fresh(3), output, [9])
    assert prompt.typecode == "q" and list(prompt) == [1, 2, 10, 11, 12, 7, 8, 9]
    assert TokenKey(prompt).data == TokenKey(list(prompt)).data
    assert list(int64s([0, 2**63 - 1])) == [0, 2**63 - 1]

"""TokenKey from the containers engines hold: each gives the list path's key, extension
equals building from the concatenation, and what is not a token id is refused alike."""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_backend.radix_cache import KeyedTokens, TokenKey, encode_token_ids

torch = pytest.importorskip("torch")

INT64 = (-(2**63), 2**63 - 1)
int64_ids = st.lists(st.integers(*INT64), max_size=40)
small_ids = st.lists(st.integers(0, 255), max_size=40)  # fits every container below

# name -> (container from a list of ids, the id range it holds)
CONTAINERS: dict[str, tuple[Callable[[list[int]], Any], tuple[int, int]]] = {
    "tuple": (tuple, INT64),
    "array q": (lambda ids: array("q", ids), INT64),
    "array l": (lambda ids: array("l", ids), INT64),
    "array Q": (lambda ids: array("Q", ids), (0, 2**63 - 1)),
    "array i": (lambda ids: array("i", ids), (-(2**31), 2**31 - 1)),
    "array H": (lambda ids: array("H", ids), (0, 2**16 - 1)),
    "array B": (lambda ids: array("B", ids), (0, 255)),
    "bytes": (bytes, (0, 255)),
    "numpy int64": (lambda ids: np.array(ids, dtype=np.int64), INT64),
    "numpy int64 big-endian": (lambda ids: np.array(ids, dtype=">i8"), INT64),
    "numpy uint64": (lambda ids: np.array(ids, dtype=np.uint64), (0, 2**63 - 1)),
    "numpy int32": (lambda ids: np.array(ids, dtype=np.int32), (-(2**31), 2**31 - 1)),
    "numpy uint16": (lambda ids: np.array(ids, dtype=np.uint16), (0, 2**16 - 1)),
    "numpy strided": (lambda ids: np.repeat(np.array(ids, dtype=np.int64), 2)[::2], INT64),
    "numpy reversed": (lambda ids: np.array(ids[::-1], dtype=np.int64)[::-1], INT64),
    "torch int64": (lambda ids: torch.tensor(ids, dtype=torch.int64), INT64),
    "torch int32": (lambda ids: torch.tensor(ids, dtype=torch.int32), (-(2**31), 2**31 - 1)),
    "torch strided": (lambda ids: torch.tensor(ids * 2, dtype=torch.int64)[: len(ids)]
                      if ids else torch.tensor([], dtype=torch.int64), INT64),
    "KeyedTokens": (KeyedTokens.of, (0, 2**63 - 1)),
    "TokenKey": (TokenKey, INT64),
}


def ids_for(name: str) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(*CONTAINERS[name][1]), max_size=40)


@pytest.mark.parametrize("name", sorted(CONTAINERS))
@settings(max_examples=30, deadline=None)  # x 20 containers
@given(data=st.data())
def test_each_container_gives_the_list_key(name: str, data: st.DataObject) -> None:
    ids = data.draw(ids_for(name))
    make = CONTAINERS[name][0]
    assert TokenKey(make(ids)).data == TokenKey(ids).data
    assert TokenKey(make(ids)).tokens() == ids


@pytest.mark.parametrize("name", sorted(CONTAINERS))
@settings(max_examples=30, deadline=None)  # x 20 containers
@given(data=st.data())
def test_extension_equals_the_concatenation(name: str, data: st.DataObject) -> None:
    prompt, output = data.draw(int64_ids), data.draw(ids_for(name))
    make = CONTAINERS[name][0]
    for head in (TokenKey(prompt), TokenKey(array("q", prompt))):
        extended = head.extended(make(output))
        assert extended.data == TokenKey(prompt + output).data
        assert len(extended) == len(prompt) + len(output)


@given(parts=st.lists(small_ids, max_size=4))
def test_chained_extensions_equal_one_build(parts: list[list[int]]) -> None:
    key = TokenKey()
    for part in parts:
        key = key.extended(np.array(part, dtype=np.int32))
    assert key.data == TokenKey([t for part in parts for t in part]).data


@given(ids=st.lists(st.integers(0, 2**63 - 1), max_size=40))
def test_token_ids_encode_alike_from_every_container(ids: list[int]) -> None:
    expected = TokenKey(ids).data
    assert encode_token_ids(ids) == expected
    assert encode_token_ids(array("q", ids)) == expected
    assert encode_token_ids(np.array(ids, dtype=np.uint64)) == expected
    assert encode_token_ids(torch.tensor(ids, dtype=torch.int64)) == expected


BAD_IDS = {
    "float list": [1, 2.5],
    "id past int64": [1, 2**63],
    "id far past int64": [1 << 70],
    "uint64 past int64": np.array([1, 2**63], dtype=np.uint64),
    "array Q past int64": array("Q", [2**64 - 1]),
    "float array": array("d", [1.0]),
    "float numpy": np.array([1.0, 2.0]),
    "float tensor": torch.tensor([1.0]),
    "bfloat16 tensor": torch.tensor([1.0], dtype=torch.bfloat16),
    "2-D numpy": np.zeros((2, 2), dtype=np.int64),
    "0-D numpy": np.int64(3),
    "2-D tensor": torch.zeros((2, 2), dtype=torch.int64),
    "text": "abc",
}


@pytest.mark.parametrize("name", sorted(BAD_IDS))
def test_what_is_not_token_ids_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        TokenKey(BAD_IDS[name])
    with pytest.raises(ValueError):
        TokenKey([1]).extended(BAD_IDS[name])


@pytest.mark.parametrize("make", [list, lambda ids: array("q", ids),
                                  lambda ids: np.array(ids), torch.tensor])
def test_negative_ids_are_keys_but_not_token_ids(make: Callable[[list[int]], Any]) -> None:
    ids = [5, -1, 7]
    assert TokenKey(make(ids)).tokens() == ids  # the router's text hashes may be negative
    with pytest.raises(ValueError):
        encode_token_ids(make(ids))


def test_numpy_object_arrays_go_through_python_ints() -> None:
    ids = [1, 2, 2**40]
    assert TokenKey(np.array(ids, dtype=object)).data == TokenKey(ids).data


def test_a_key_owns_its_bytes() -> None:
    ids = np.arange(10, dtype=np.int64)
    key = TokenKey(ids)
    ids[:] = 0  # the engine reuses its buffer
    assert key.tokens() == list(range(10))


class _NoPythonInts(array):
    """An array that refuses to hand out Python ints: only its buffer can be read."""

    def tolist(self) -> list[int]:
        raise AssertionError("encoded through Python ints")

    def __iter__(self) -> Any:
        raise AssertionError("encoded through Python ints")


class _NoPythonIntsNumpy(np.ndarray):
    def tolist(self) -> Any:
        raise AssertionError("encoded through Python ints")

    def __iter__(self) -> Any:
        raise AssertionError("encoded through Python ints")


def test_buffers_are_copied_not_walked() -> None:
    ids = list(range(1000, 1100))
    expected = TokenKey(ids).data
    assert TokenKey(_NoPythonInts("q", ids)).data == expected
    assert TokenKey([]).extended(_NoPythonInts("q", ids)).data == expected
    assert TokenKey(np.array(ids, dtype=np.int32).view(_NoPythonIntsNumpy)).data == expected
    assert TokenKey(torch.tensor(ids).numpy().view(_NoPythonIntsNumpy)).data == expected

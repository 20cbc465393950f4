"""KeyedTokens: prompts that carry their encoded radix key."""

from __future__ import annotations

import pytest

from engine_backend.radix_cache import KeyedTokens, RadixCache, TokenKey
from engine_backend.sim.engine import _prompt_key


def test_concat_key_is_the_encoding_of_the_whole_list() -> None:
    head = KeyedTokens.of(range(100, 1100))
    prompt = KeyedTokens.concat(head, [7, 8, 9], KeyedTokens.of([]), KeyedTokens.of([1 << 40]))
    assert list(prompt) == [*range(100, 1100), 7, 8, 9, 1 << 40]
    assert prompt.key.data == TokenKey(list(prompt)).data
    assert type(prompt + [1]) is list  # derived lists carry no (stale) key


@pytest.mark.parametrize("stride", [1, 3, 16, 5000])
def test_strided_key_matches_the_sliced_list(stride: int) -> None:
    prompt = KeyedTokens.of(range(5, 1234))
    assert prompt.key.data_strided(stride) == TokenKey(prompt[::stride]).data
    assert TokenKey([]).data_strided(stride) == b""


def test_negative_ids_are_rejected() -> None:
    with pytest.raises(ValueError):
        KeyedTokens.of([1, -2])
    with pytest.raises(ValueError):
        KeyedTokens.concat(KeyedTokens.of([1]), [-1])


def test_engine_uses_the_carried_key_and_detects_a_resized_list() -> None:
    prompt = KeyedTokens.of(range(10))
    assert _prompt_key(prompt) is prompt.key
    prompt.append(10)  # mutated in place: the key is stale and must not be used
    assert _prompt_key(prompt).data == TokenKey(list(range(11))).data


def test_a_keyed_prompt_matches_like_a_plain_one() -> None:
    cache = RadixCache()
    cache.insert(KeyedTokens.of(range(50)).key)
    assert cache.match_prefix(KeyedTokens.concat(KeyedTokens.of(range(40)), [99])).length == 40


def test_token_ids_key_is_the_carried_key_or_an_encoding() -> None:
    prompt = KeyedTokens.of(range(10))
    assert TokenKey.of_token_ids(prompt) is prompt.key
    assert TokenKey.of_token_ids(list(prompt)).data == prompt.key.data
    prompt.append(10)  # resized: the carried key is stale
    assert TokenKey.of_token_ids(prompt).data == TokenKey(list(range(11))).data
    with pytest.raises(ValueError):
        TokenKey.of_token_ids([3, -1])

"""Unit tests of the radix cache: match / insert / split / lock / evict, and both eviction orders."""

from __future__ import annotations

import itertools

import pytest

from engine_backend.radix_cache import RadixCache, TokenKey


def make_cache(**kwargs) -> RadixCache:
    ticks = itertools.count()
    return RadixCache(clock=lambda: float(next(ticks)), **kwargs)


def test_empty_cache_matches_nothing() -> None:
    cache = make_cache()
    match = cache.match_prefix([1, 2, 3])
    assert (match.length, match.value, match.node) == (0, [], cache.root)
    assert cache.match_prefix([]).length == 0
    assert cache.insert([]) == 0
    assert cache.total_size() == 0


def test_insert_returns_already_present_prefix_length() -> None:
    cache = make_cache()
    assert cache.insert([1, 2, 3, 4]) == 0
    assert cache.insert([1, 2, 3, 4]) == 4
    assert cache.insert([1, 2, 9]) == 2
    assert cache.insert([1, 2]) == 2
    assert cache.insert([7]) == 0
    assert cache.total_size() == 4 + 1 + 1


def test_match_splits_mid_edge_and_returns_values() -> None:
    cache = make_cache(store_values=True)
    cache.insert([1, 2, 3, 4, 5], [10, 20, 30, 40, 50])
    assert cache.num_nodes() == 1
    match = cache.match_prefix([1, 2, 3, 8])
    assert match.length == 3
    assert match.value == [10, 20, 30]
    assert match.node.tokens() == [1, 2, 3]  # split so the node ends exactly at the match
    assert cache.num_nodes() == 2
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).value == [10, 20, 30, 40, 50]
    assert cache.total_size() == 5


def test_duplicate_values_are_not_stored() -> None:
    cache = make_cache(store_values=True)
    cache.insert([1, 2, 3], [10, 20, 30])
    assert cache.insert([1, 2, 3, 4], [91, 92, 93, 94]) == 3
    assert cache.match_prefix([1, 2, 3, 4]).value == [10, 20, 30, 94]


def test_values_must_match_the_store_mode() -> None:
    with pytest.raises(ValueError):
        make_cache(store_values=True).insert([1, 2])
    with pytest.raises(ValueError):
        make_cache(store_values=True).insert([1, 2], [5])
    with pytest.raises(ValueError):
        make_cache().insert([1, 2], [5, 6])


def test_divergence_deep_inside_a_long_edge() -> None:
    cache = make_cache()
    base = list(range(1000, 4000))
    cache.insert(base)
    for cut in (1, 15, 16, 17, 100, 1023, 2999):
        other = base[:cut] + [-1]
        assert cache.match_prefix(other, touch=False).length == cut
    assert cache.total_size() == 3000


def test_numpy_like_keys_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    cache = make_cache(store_values=True)
    cache.insert(np.arange(5), np.arange(10, 15))
    match = cache.match_prefix(np.arange(3))
    assert (match.length, match.value) == (3, [10, 11, 12])


def test_lock_moves_sizes_and_blocks_eviction() -> None:
    cache = make_cache()
    cache.insert([1, 2, 3, 4])
    cache.insert([1, 2, 5, 6])
    node = cache.match_prefix([1, 2, 3, 4]).node
    assert cache.inc_lock_ref(node) == 4  # [1, 2] and [3, 4]
    assert (cache.protected_size(), cache.evictable_size()) == (4, 2)
    assert cache.inc_lock_ref(node) == 0  # already protected
    assert cache.evict(100) == 2  # only [5, 6] can go
    assert cache.match_prefix([1, 2, 3, 4]).length == 4
    assert cache.dec_lock_ref(node) == 0
    assert cache.dec_lock_ref(node) == 4
    assert cache.evict(100) == 4
    assert cache.total_size() == 0
    with pytest.raises(ValueError):
        cache.inc_lock_ref(node)  # evicted


def test_dec_lock_ref_on_unlocked_node_raises() -> None:
    cache = make_cache()
    cache.insert([1, 2])
    with pytest.raises(ValueError):
        cache.dec_lock_ref(cache.match_prefix([1, 2]).node)


def test_split_of_a_locked_edge_keeps_the_lock() -> None:
    cache = make_cache()
    cache.insert([1, 2, 3, 4])
    node = cache.match_prefix([1, 2, 3, 4]).node
    cache.inc_lock_ref(node)
    cache.insert([1, 2, 9])  # splits the locked edge
    assert cache.protected_size() == 4 and cache.evictable_size() == 1
    assert cache.evict(10) == 1
    cache.dec_lock_ref(node)
    assert (cache.protected_size(), cache.evictable_size()) == (0, 4)


def test_lru_evicts_least_recently_used_leaf_first() -> None:
    freed: list[list[int]] = []
    cache = make_cache(store_values=True, on_evict=freed.append)
    cache.insert([1, 1], [11, 12])
    cache.insert([2, 2], [21, 22])
    cache.insert([3, 3], [31, 32])
    cache.match_prefix([1, 1])  # touch: [2, 2] is now the oldest
    assert cache.evict(1) == 2
    assert freed == [[21, 22]]
    assert cache.match_prefix([2, 2]).length == 0
    assert cache.evict(3) == 4
    assert freed[1] == [31, 32, 11, 12]


def test_evicting_a_leaf_exposes_its_parent() -> None:
    cache = make_cache()
    cache.insert([1, 2, 3])
    cache.insert([1, 2, 3, 4, 5])
    assert cache.evict(1) == 2  # the leaf [4, 5]
    assert cache.match_prefix([1, 2, 3, 4]).length == 3
    assert cache.evict(1) == 3
    assert cache.num_nodes() == 0


def test_lru_ignores_pins() -> None:
    cache = make_cache(eviction="lru")
    cache.insert([1, 1], owner="a")
    cache.insert([2, 2], owner="b")
    cache.pin("a")
    cache.evict(1)
    assert cache.match_prefix([1, 1]).length == 0


def test_priority_order_keeps_pinned_owner() -> None:
    cache = make_cache(eviction="priority")
    cache.insert([1, 1], owner="waiting-on-tool")
    cache.insert([2, 2], owner="other")
    cache.pin("waiting-on-tool")
    cache.match_prefix([2, 2])  # more recent, but unpinned
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 1], touch=False).length == 2
    assert cache.match_prefix([2, 2], touch=False).length == 0
    # Unpinned again, it is an ordinary leaf.
    cache.unpin("waiting-on-tool")
    cache.insert([3, 3], owner="other")
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 1], touch=False).length == 0


def test_priority_order_lower_owner_priority_goes_first() -> None:
    cache = make_cache(eviction="priority")
    cache.set_owner_priority("high", 5.0)
    cache.set_owner_priority("low", 1.0)
    cache.insert([1, 1], owner="high")
    cache.insert([2, 2], owner="low")
    cache.insert([3, 3], owner="low")
    cache.match_prefix([3, 3])
    assert cache.evict(3) == 4
    assert cache.match_prefix([1, 1], touch=False).length == 2
    # Lowering a priority takes effect at once (the lazy heap is refreshed).
    cache.insert([4, 4], owner="mid")
    cache.set_owner_priority("mid", 3.0)
    cache.set_owner_priority("high", 0.5)
    assert cache.evict(1) == 2
    assert cache.match_prefix([1, 1], touch=False).length == 0
    assert cache.match_prefix([4, 4], touch=False).length == 2


def test_shared_node_takes_the_max_protection_of_its_owners() -> None:
    cache = make_cache(eviction="priority")
    cache.insert([7, 7, 7, 1], owner="a")
    cache.insert([7, 7, 7, 2], owner="b")  # [7, 7, 7] is shared
    cache.insert([9, 9], owner="c")
    cache.pin("b")
    freed = cache.evict(2)  # [7,7,7,1] (owner a) and [9, 9] (owner c) go first
    assert freed == 3
    assert cache.match_prefix([7, 7, 7, 2], touch=False).length == 4
    # The shared prefix outlives the unpinned branch: b's pin covers it.
    assert cache.match_prefix([7, 7, 7, 1], touch=False).length == 3


def test_retired_owner_context_goes_first_but_shared_prefix_stays() -> None:
    cache = make_cache(eviction="priority")
    cache.insert([3, 3], owner="idle")  # the least recently used leaf
    cache.insert([7, 7, 7, 2, 2], owner="live")
    cache.insert([7, 7, 7, 1, 1], owner="ended")  # [7, 7, 7] is shared; most recent
    cache.retire_owner("ended")
    assert cache.evict(1) == 2  # the ended program's private tail, not the LRU leaf
    assert cache.match_prefix([7, 7, 7, 1, 1], touch=False).length == 3
    assert cache.match_prefix([3, 3], touch=False).length == 2
    # The shared prefix is still owned by "live": not retired when the tail goes.
    assert cache.evict(2) == 2  # [3, 3], by LRU again
    assert cache.match_prefix([7, 7, 7, 2, 2], touch=False).length == 5


def test_retired_prefix_taken_up_again_is_ordinary() -> None:
    cache = make_cache(eviction="priority")
    cache.insert([5, 5, 5], owner="ended")
    cache.retire_owner("ended")
    cache.insert([6, 6], owner="other")
    cache.insert([5, 5, 5], owner="newcomer")  # a new program shares it: priority back
    assert cache.evict(1) == 2  # now [6, 6] is simply least recently used
    assert cache.match_prefix([5, 5, 5], touch=False).length == 3


def test_lru_ignores_retirement() -> None:
    cache = make_cache(eviction="lru")
    cache.insert([1, 1], owner="a")
    cache.insert([2, 2], owner="b")
    cache.retire_owner("b")
    cache.evict(1)
    assert cache.match_prefix([2, 2], touch=False).length == 2


def test_insert_priority_protects_under_priority_order() -> None:
    cache = make_cache(eviction="priority")
    cache.insert([1], priority=2.0)
    cache.insert([2], priority=0.0)
    cache.evict(1)
    assert cache.match_prefix([1], touch=False).length == 1


def test_unknown_eviction_order_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown eviction order"):
        RadixCache(eviction="mru")


def test_reset_drops_everything() -> None:
    cache = make_cache()
    cache.insert([1, 2, 3])
    cache.inc_lock_ref(cache.match_prefix([1, 2, 3]).node)
    cache.reset()
    assert cache.total_size() == cache.protected_size() == cache.num_nodes() == 0
    assert cache.match_prefix([1, 2, 3]).length == 0


def test_token_key_is_interchangeable_with_lists() -> None:
    cache = make_cache(store_values=True)
    prompt = TokenKey([5, 6, 7])
    assert len(prompt) == 3 and prompt.tokens() == [5, 6, 7]
    full = prompt.extended([8, 9])
    assert full.tokens() == [5, 6, 7, 8, 9]
    assert cache.insert(full, [50, 60, 70, 80, 90]) == 0
    assert cache.match_prefix([5, 6, 7, 8]).value == [50, 60, 70, 80]
    assert cache.match_prefix(prompt).length == 3
    assert cache.insert([5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 0, 100]) == 5
    assert TokenKey.from_bytes(full.data).tokens() == full.tokens()


def test_one_key_across_several_caches() -> None:
    replicas = [make_cache() for _ in range(3)]
    replicas[1].insert([1, 2, 3, 4])
    key = TokenKey([1, 2, 3, 9])
    assert [r.match_prefix(key, touch=False).length for r in replicas] == [0, 3, 0]


def test_bad_tokens_are_rejected() -> None:
    cache = make_cache()
    with pytest.raises(ValueError):
        cache.insert([1, 2.5])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        cache.match_prefix([1 << 70])
    with pytest.raises(ValueError):
        TokenKey.from_bytes(b"123")
    assert cache.total_size() == 0


def test_long_token_ids_and_negative_ids_round_trip() -> None:
    cache = make_cache()
    key = [-1, 2**40, 0, 2**63 - 1]
    cache.insert(key)
    found = cache.match_prefix(key)
    assert found.length == 4 and found.node.tokens() == key

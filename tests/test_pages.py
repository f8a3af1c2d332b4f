"""PageAllocator: reference counts, free/evictable/in-use partition, prefix cache. Pure Python."""

from __future__ import annotations

import random

import pytest

from scheduler.pages import PageAllocator

P = 4


def _toks(start: int, n_pages: int = 1) -> list[int]:
    return list(range(start, start + n_pages * P))


def _register_chain(a: PageAllocator, pages: list[int], tokens: list[int]) -> list[int]:
    keys, parent = [], None
    for i, page in enumerate(pages):
        parent = a.register(page, parent, tokens[i * P : (i + 1) * P])
        keys.append(parent)
    return keys


def test_allocate_and_free_refcounts():
    a = PageAllocator(4, P, True)
    assert a.num_free == 4
    got = a.allocate(3)
    assert got == [0, 1, 2] and a.num_free == 1 and a.num_used == 3
    assert all(a.refcount(p) == 1 for p in got)
    assert a.allocate(2) is None and a.num_free == 1  # not enough: nothing changes
    assert a.allocate(0) == []
    a.free(got)
    assert a.num_free == 4 and all(a.refcount(p) == 0 for p in got)
    with pytest.raises(RuntimeError, match="freed more often"):
        a.free([0])
    a.check_integrity()


def test_page_never_handed_out_while_referenced():
    a = PageAllocator(3, P, True)
    held = a.allocate(2)
    a.acquire([])  # no-op
    rest = a.allocate(1)
    assert set(rest).isdisjoint(held)
    assert a.allocate(1) is None
    a.free(rest)
    again = a.allocate(1)
    assert again == rest  # only the freed page can come back
    a.check_integrity()


def test_register_and_match_chain():
    a = PageAllocator(8, P, True)
    tokens = _toks(100, 3)
    pages = a.allocate(3)
    keys = _register_chain(a, pages, tokens)
    assert len(set(keys)) == 3 and a.key_of(pages[1]) == keys[1]
    a.free(reversed(pages))
    assert a.num_evictable == 3 and a.num_free == 8  # cached pages still count as free

    hit = a.match_prefix(tokens + [1, 2], max_pages=10)
    assert hit == pages
    assert all(a.refcount(p) == 1 for p in hit) and a.num_evictable == 0  # matched pages leave evictable
    again = a.match_prefix(tokens, max_pages=2)  # capped
    assert again == pages[:2] and a.refcount(pages[0]) == 2
    a.check_integrity()


def test_match_stops_at_first_miss_and_needs_same_parent():
    a = PageAllocator(8, P, True)
    tokens = _toks(0, 2)
    pages = a.allocate(2)
    _register_chain(a, pages, tokens)
    assert a.find_prefix(tokens[:P] + [99] * P, 5) == pages[:1]  # second page differs
    assert a.find_prefix([99] * P + tokens[P:], 5) == []  # second page alone: wrong parent
    assert a.find_prefix(tokens[: P + 1], 5) == pages[:1]  # only full pages count
    assert a.find_prefix(tokens, 0) == []


def test_hash_collision_is_never_a_hit():
    # In CPython hash(-1) == hash(-2), so these pages hash alike but differ.
    a = PageAllocator(4, P, True)
    page = a.allocate(1)
    a.register(page[0], None, [-1, 5, 6, 7])
    assert hash((None, (-1, 5, 6, 7))) == hash((None, (-2, 5, 6, 7)))
    assert a.find_prefix([-2, 5, 6, 7, 8], 1) == []
    assert a.find_prefix([-1, 5, 6, 7, 8], 1) == page


def test_duplicate_register_returns_existing_key():
    a = PageAllocator(4, P, True)
    first, second = a.allocate(2)
    k1 = a.register(first, None, _toks(0))
    k2 = a.register(second, None, _toks(0))
    assert k1 == k2 and a.key_of(second) is None
    a.free([second])  # unindexed: straight back to the free list
    assert a.num_evictable == 0 and a.num_free == 3
    assert a.register(first, None, _toks(0)) == k1  # registering again is idempotent
    with pytest.raises(ValueError, match="holds 4 tokens"):
        a.register(first, None, [1, 2])
    with pytest.raises(RuntimeError, match="not in use"):
        a.register(second, None, _toks(50))
    a.check_integrity()


def test_lru_eviction_prefers_free_then_oldest_cached():
    a = PageAllocator(4, P, True)
    pages = a.allocate(4)
    for i, page in enumerate(pages[:3]):  # three single-page prefixes, page 3 unindexed
        a.register(page, None, _toks(10 * i))
    a.free([pages[0]])
    a.free([pages[1]])
    a.free([pages[2]])
    a.free([pages[3]])
    assert a.num_free == 4 and a.num_evictable == 3
    assert a.allocate(1) == [pages[3]]  # the free page goes first
    assert a.find_prefix(_toks(0), 1) == [pages[0]]
    a.match_prefix(_toks(0), 1)  # touch page 0: now the most recently used
    a.free([pages[0]])
    got = a.allocate(1)
    assert got == [pages[1]]  # least recently used cached page, its index entry dropped
    assert a.find_prefix(_toks(10), 1) == []
    assert a.find_prefix(_toks(0), 1) == [pages[0]] and a.find_prefix(_toks(20), 1) == [pages[2]]
    a.check_integrity()


def test_evicted_parent_breaks_the_chain_without_wrong_hits():
    a = PageAllocator(2, P, True)
    pages = a.allocate(2)
    _register_chain(a, pages, _toks(0, 2))
    a.free([pages[0], pages[1]])  # head freed first -> evicted first
    (page,) = a.allocate(1)
    assert page == pages[0]
    assert a.find_prefix(_toks(0, 2), 2) == []
    # The same first page computed again gets a fresh key: the orphaned child stays unreachable.
    a.register(page, None, _toks(0))
    assert a.find_prefix(_toks(0, 2), 2) == [page]
    a.check_integrity()


def test_acquire_free_page_is_an_error():
    a = PageAllocator(2, P, True)
    with pytest.raises(RuntimeError, match="cannot be acquired"):
        a.acquire([0])


def test_stats_and_disabled_caching():
    a = PageAllocator(4, P, True)
    pages = a.allocate(2)
    _register_chain(a, pages, _toks(0, 2))
    a.match_prefix(_toks(0, 2) + [7, 7], 2)  # 8 of 10 tokens hit
    a.match_prefix([5] * 10, 2)  # miss
    s = a.stats()
    assert s["prefix_queries"] == 2 and s["prefix_query_tokens"] == 20 and s["prefix_hit_tokens"] == 8
    assert a.prefix_hit_rate == pytest.approx(0.4)

    off = PageAllocator(4, P, False)
    page = off.allocate(1)
    assert off.match_prefix(_toks(0), 1) == [] and off.prefix_queries == 0
    off.free(page)
    assert off.num_free == 4


def test_random_ops_keep_the_partition():
    rng = random.Random(0)
    a = PageAllocator(16, P, True)
    owned: list[list[int]] = []  # each entry: one holder's references
    for _ in range(3000):
        op = rng.random()
        if op < 0.35:
            got = a.allocate(rng.randint(1, 4))
            if got is not None:
                parent = None
                for page in got:
                    if rng.random() < 0.7:
                        parent = a.register(page, parent, [rng.randint(0, 2)] * P)
                owned.append(got)
        elif op < 0.6:
            toks = [rng.randint(0, 2) for _ in range(3 * P)]
            hit = a.match_prefix(toks, 3)
            if hit:
                owned.append(hit)
        elif owned:
            a.free(reversed(owned.pop(rng.randrange(len(owned)))))
        a.check_integrity()
        refs: dict[int, int] = {}
        for holder in owned:
            for page in holder:
                refs[page] = refs.get(page, 0) + 1
        assert all(a.refcount(p) == refs.get(p, 0) for p in range(16))
    for holder in owned:
        a.free(holder)
    assert a.num_free == 16

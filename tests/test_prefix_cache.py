"""The prefix cache's tree (serving/engine/prefix_cache.py) against a plain dictionary of
everything inserted: lookups give exactly what was stored for their prefix, the byte
accounting matches the tree, eviction keeps it within budget, least recently used first."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engine.prefix_cache import (
    ARRAY_BYTES,
    NODE_BYTES,
    TOKEN,
    PrefixCache,
    prefix_hashes,
    token_rows,
)

START = np.full((2, 3), -1.0, np.float32)
START_LOGPROBS = np.log(np.full(5, 0.2, np.float32))


def value(prefix: tuple[int, ...]) -> float:
    """A per-token value that depends on the whole prefix, as a log-prob does."""
    return int.from_bytes(hashlib.sha256(repr(prefix).encode()).digest()[:3], "big") / 1e3


def rows(ids: list[int]) -> np.ndarray:
    logprobs = np.array([value(tuple(ids[: i + 1])) for i in range(len(ids))], np.float32)
    greedy = np.array([len(ids[:i]) % 5 for i in range(len(ids))])
    return token_rows(np.array(ids), logprobs, greedy, -logprobs)


def state_of(prefix: tuple[int, ...]) -> np.ndarray:
    return np.full((2, 3), value(prefix), np.float32)


def accounted(cache: PrefixCache) -> int:
    total = 0
    for node in cache._live():
        total += NODE_BYTES + node.edge.nbytes + 4 * len(node.edge)
        assert node.key == node.edge["id"].astype("<i4").tobytes()
        if node.state is not None:
            total += node.state.nbytes + ARRAY_BYTES
    return total


paths = st.lists(st.integers(0, 4), min_size=1, max_size=12)
operations = st.lists(st.tuples(st.sampled_from(["insert", "lookup"]), paths,
                                st.sets(st.integers(2, 12), max_size=3)), max_size=40)


@settings(deadline=None, derandomize=True, max_examples=150)
@given(operations, st.sampled_from([0, 600, 2500, 1 << 20]))
def test_lookups_give_what_was_stored_for_their_prefix(ops, budget):
    cache = PrefixCache(budget, 4, START, START_LOGPROBS)
    for kind, ids, depths in ops:
        if kind == "insert":
            cache.insert(rows(ids), {d: state_of(tuple(ids[: d - 1]))
                                     for d in depths if d <= len(ids)})
            assert cache.bytes == accounted(cache) <= max(budget, 0)
            assert cache.entries == sum(n.state is not None for n in cache._live())
        hit = cache.lookup(np.array(ids))
        # recency: an ancestor is never less recently used than a descendant, so the least
        # recently used node is a leaf
        position = {node: i for i, node in enumerate(cache._order)}
        assert len(position) == cache.nodes
        assert all(position[node] > position[child] for node in cache._live()
                   for child in node.children.values())
        assert 1 <= hit.known <= len(ids) and len(hit.tokens) == hit.known
        expected = rows(ids)[: hit.known]
        # every known token's values are those of its own prefix (the first token's come
        # from the start distribution when the tree has nothing)
        if cache.root.children.get(ids[0]) is not None:
            assert np.array_equal(hit.tokens, expected)
        else:
            assert hit.known == 1 and hit.tokens["logprob"][0] == START_LOGPROBS[ids[0]]
        assert 1 <= hit.state_depth <= hit.known
        if hit.state_depth == 1:
            assert hit.state is START
        else:
            assert np.array_equal(hit.state, state_of(tuple(ids[: hit.state_depth - 1])))


def test_a_stored_state_serves_every_extension_of_its_prefix():
    cache = PrefixCache(1 << 20, 256, START, START_LOGPROBS)
    cache.insert(rows([1, 2, 3, 4]), {4: state_of((1, 2, 3))})
    hit = cache.lookup(np.array([1, 2, 3, 4, 0, 0]))
    assert (hit.known, hit.state_depth) == (4, 4)
    assert np.array_equal(hit.tokens, rows([1, 2, 3, 4]))
    # a path that leaves it before the state's depth gets only what it shares
    hit = cache.lookup(np.array([1, 2, 0]))
    assert (hit.known, hit.state_depth) == (2, 1) and hit.state is START
    # a state inserted later inside an edge splits it
    cache.insert(rows([1, 2]), {2: state_of((1,))})
    assert cache.lookup(np.array([1, 2, 0])).state_depth == 2
    assert cache.entries == 2 and cache.nodes == 2


def test_the_least_recently_used_leaves_go_first():
    one_entry = NODE_BYTES + 4 * (TOKEN.itemsize + 4) + START.nbytes + ARRAY_BYTES
    cache = PrefixCache(2 * one_entry, 256, START, START_LOGPROBS)
    cache.insert(rows([1, 1, 1, 1]), {4: state_of((1, 1, 1))})
    cache.insert(rows([2, 2, 2, 2]), {4: state_of((2, 2, 2))})
    cache.lookup(np.array([1, 1, 1, 1]))  # [1, ...] is now the more recent
    cache.insert(rows([3, 3, 3, 3]), {4: state_of((3, 3, 3))})
    assert cache.lookup(np.array([1, 1, 1, 1])).state_depth == 4
    assert cache.lookup(np.array([2, 2, 2, 2])).known == 1  # evicted
    assert cache.lookup(np.array([3, 3, 3, 3])).state_depth == 4
    assert cache.bytes == accounted(cache) <= 2 * one_entry


def test_off_stores_nothing():
    cache = PrefixCache(0, 256, START, START_LOGPROBS)
    cache.insert(rows([1, 2, 3]), {3: state_of((1, 2))})
    assert cache.nodes == cache.bytes == 0
    hit = cache.lookup(np.array([1, 2, 3]))
    assert (hit.known, hit.state_depth) == (1, 1)


@settings(deadline=None, derandomize=True, max_examples=100)
@given(st.lists(st.integers(0, 3), max_size=30), st.lists(st.integers(0, 3), max_size=30))
def test_a_prefix_hash_is_the_prefix_s_own(a, b):
    hashes_a, hashes_b = prefix_hashes(np.array(a, np.int64)), prefix_hashes(
        np.array(b, np.int64))
    for i in range(len(a) + 1):
        for j in range(len(b) + 1):
            if a[:i] == b[:j]:
                assert hashes_a[i] == hashes_b[j]


async def _claims() -> None:
    cache = PrefixCache(1 << 20, 256, START, START_LOGPROBS)
    prompt = np.array([1, 2, 3, 4, 5])
    claim = cache.claim(prompt)
    future = claim[1] if claim is not None else None
    assert future is not None and cache.claim(prompt) is None  # one claim a prefix
    assert cache.claimed_beyond(np.array([1, 2, 3, 4, 5, 6]), 1) is future
    assert cache.claimed_beyond(np.array([1, 2, 3, 4, 5, 6]), 5) is None  # not beyond
    assert cache.claimed_beyond(np.array([1, 2, 3, 4, 0, 6]), 1) is None  # another prefix
    assert cache.claimed_beyond(prompt[:4], 1) is None  # longer than the read
    cache.unclaim(claim)
    assert future.done() and cache.claimed_beyond(prompt, 1) is None
    assert not cache._claims and not cache._claim_lengths


def test_claims_are_found_only_by_reads_that_extend_them():
    import asyncio

    asyncio.run(_claims())

"""The prefix cache: exact recurrent states of token prefixes already read, per model.

A recurrent model's whole context is its state: a few kilobytes (10.4 KB for a 2 x 650
LSTM) however long the history. So a prefix read once never needs reading again: a
request whose tokens extend a cached prefix runs only the rest, with exactly the numbers a
read from the start gives (the same network, the same state).

What is cached, along a radix tree of token ids from the start state (after `<eos>`):
- per token, its log-prob given what precedes it and the most likely token there with its
  log-prob (16 bytes, and 4 for its id in its node's key, which lookups compare as bytes):
  a request whose every token is in the tree runs nothing at all;
- at some nodes, the state *before* the node's last token, S(prefix[:-1]), as a state token
  holds it: reading that last token again gives both the state after the prefix and the
  next-token distribution (4V bytes, 40 KB at V = 10,000, which is not stored), exactly,
  for the price of one token, which the request reads anyway. Reads store one at the end
  of prompts, session prefixes and scored contexts, every `interval` tokens of long
  inputs, and where a read leaves the tree after sharing enough of it (operations.read).

Bounded by bytes, least recently used out. A lookup touches the nodes it passes from the
deepest up, so an ancestor is always more recently used than its descendants, and the
least recently used node is always a leaf: eviction removes leaves only and the tree stays
a tree of whole prefixes.

Requests that would compute the same prefix at once (64 completions of one prompt, four
answers to one question sent as four requests) compute it once: the first claims the
prefix while it reads it, the others wait for its entry (`claimed_beyond`).

Everything here runs on the event loop's thread (but `clear` at an unload, when no request
holds the version any more), so nothing needs a lock; states are never
changed in place by anyone (the scheduler stacks copies), so an evicted state that a
request still holds stays valid for it.

Written here rather than taken from a library: a token-id radix tree with per-token values
and byte-bounded, leaf-first LRU is a few hundred lines that no package offers in a form
that fits (vLLM's and SGLang's prefix caches are tied to their KV-block allocators).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

# per token: its id, its log-prob, the most likely id there and its log-prob
TOKEN = np.dtype([("id", "<i4"), ("logprob", "<f4"), ("greedy_id", "<i4"),
                  ("greedy_logprob", "<f4")])
# bytes of a node beside its tokens and state: the object, its children dict, its array
# header and its place in the recency order (measured with tracemalloc by bench/cache.py,
# which reports both)
NODE_BYTES = 420
ARRAY_BYTES = 128  # a state array's header
# claims are found by a polynomial hash of the prefix (mod 2^64, a secret odd base per
# process, so a client cannot aim collisions), verified on a match
_BASE = secrets.randbits(64) | 1
_HASH_BASE, _HASH_INVERSE = np.uint64(_BASE), np.uint64(pow(_BASE, -1, 1 << 64))


def prefix_hashes(ids: np.ndarray) -> np.ndarray:
    """h[i], a hash of ids[:i], for every i at once (O(n) in numpy): h[i] is the sum over
    j < i of (ids[j] + 1) * B^(i - j - 1), all mod 2^64."""
    n = len(ids)
    hashes = np.zeros(n + 1, np.uint64)
    with np.errstate(over="ignore"):
        up = np.cumprod(np.full(n, _HASH_BASE, np.uint64))  # B^1 .. B^n
        down = np.cumprod(np.full(n, _HASH_INVERSE, np.uint64))  # B^-1 .. B^-n
        hashes[1:] = np.cumsum((ids.astype(np.uint64) + np.uint64(1)) * down) * up
    return hashes


def token_rows(ids: np.ndarray, logprobs: np.ndarray, greedy_ids: np.ndarray | None,
               greedy_logprobs: np.ndarray | None) -> np.ndarray:
    """Per-token values in the tree's layout; no greedy values: id -1, log-prob NaN."""
    rows = np.empty(len(ids), TOKEN)
    rows["id"], rows["logprob"] = ids, logprobs
    rows["greedy_id"] = -1 if greedy_ids is None else greedy_ids
    rows["greedy_logprob"] = np.nan if greedy_logprobs is None else greedy_logprobs
    return rows


class _Node:
    __slots__ = ("parent", "edge", "key", "children", "state", "depth")

    def __init__(self, parent: _Node | None, edge: np.ndarray, depth: int):
        self.parent = parent
        self.edge = edge  # TOKEN rows from the parent to this node
        self.key = _key(edge["id"])  # their ids as bytes: one comparison a node
        self.children: dict[int, _Node] = {}  # by the first token id of their edge
        self.state: np.ndarray | None = None  # [L, S]: before this node's last token
        self.depth = depth  # tokens from the root to the end of `edge`


@dataclass
class Hit:
    """What the tree knows of a request's tokens."""

    known: int  # ids[:known] have their per-token values in `tokens`
    tokens: np.ndarray  # TOKEN rows of ids[:known]
    state_depth: int  # the deepest stored state on the path: S(ids[:state_depth - 1])
    state: np.ndarray  # that state (depth 1: the start state, after `<eos>`)


class PrefixCache:
    """One model version's cache of prefixes (token ids from the start state)."""

    def __init__(self, budget_bytes: int, interval: int, start_state: np.ndarray,
                 start_logprobs: np.ndarray, metrics=None, label: str = ""):
        self.budget, self.interval = budget_bytes, interval
        self.start_state, self.start_logprobs = start_state, start_logprobs
        greedy = int(np.argmax(start_logprobs))
        self._first = (greedy, float(start_logprobs[greedy]))  # at every path's first token
        self.root = _Node(None, np.empty(0, TOKEN), 0)
        self._order: OrderedDict[_Node, None] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.nodes = 0
        self.entries = 0  # nodes holding a state
        # prefixes being read: (length, hash) -> (ids, done); and how many at each length
        self._claims: dict[tuple[int, int], tuple[np.ndarray, asyncio.Future]] = {}
        self._claim_lengths: dict[int, int] = {}
        self._metrics, self._label = metrics, label
        if metrics is not None:
            metrics.prefix_cache_budget.labels(label).set(budget_bytes)
            self._publish()

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    # -- lookups --------------------------------------------------------------------------
    def lookup(self, ids: np.ndarray) -> Hit:
        """The longest prefix of `ids` in the tree and the deepest state stored along it.
        Without one the start state serves (depth 1): every path starts after `<eos>`,
        whose distribution gives the first token's values."""
        n = len(ids)
        pieces, visited = [], []
        node, depth = self.root, 0
        state_depth, state = 1, self.start_state
        key = _key(ids) if self.enabled else b""
        first_ids = ids.tolist() if self.enabled else []
        while depth < n and self.enabled:  # a few microseconds a node on the path
            child = node.children.get(first_ids[depth])
            if child is None:
                break
            edge = child.edge
            matched = _matched(child, ids, key, depth)
            if matched == len(edge):
                pieces.append(edge)
                visited.append(child)
                depth += len(edge)
                node = child
                if child.state is not None:
                    state_depth, state = depth, child.state
                continue
            pieces.append(edge[:matched])
            visited.append(child)
            depth += matched
            break
        for touched in reversed(visited):  # deepest first: ancestors end up more recent
            self._touch(touched)
        if depth == 0 and n:  # the first token's values come from the start distribution
            first = token_rows(ids[:1], self.start_logprobs[ids[:1]], np.array([self._first[0]]),
                               np.array([self._first[1]], np.float32))
            pieces, depth = [first], 1
        tokens = np.concatenate(pieces) if pieces else np.empty(0, TOKEN)
        return Hit(depth, tokens, state_depth, state)

    def note_lookup(self, looked_up: int, reused: int) -> None:
        """A read's use of the tree: of the `looked_up` tokens it would run without the
        cache (all but the last, after the free start state), `reused` did not run."""
        if self._metrics is not None and self.enabled:
            self._metrics.prefix_cache_lookups.labels(self._label,
                                                      "hit" if reused else "miss").inc()
            self._metrics.prefix_cache_lookup_tokens.labels(self._label).inc(looked_up)
            self._metrics.prefix_cache_hit_tokens.labels(self._label).inc(reused)

    # -- requests reading the same prefix at once -----------------------------------------
    def claimed_beyond(self, ids: np.ndarray, depth: int) -> asyncio.Future | None:
        """The deepest claim on a prefix of `ids` longer than `depth` tokens: its entry will
        serve this request better than what the tree holds now. One hash lookup per
        distinct length claimed."""
        lengths = [k for k in self._claim_lengths if depth < k <= len(ids)]
        if not lengths:
            return None
        hashes = prefix_hashes(ids)
        for length in sorted(lengths, reverse=True):
            claimed = self._claims.get((length, int(hashes[length])))
            if claimed is not None and np.array_equal(claimed[0], ids[:length]):
                return claimed[1]
        return None

    def claim(self, ids: np.ndarray) -> tuple[tuple[int, int], asyncio.Future] | None:
        """Marks the prefix `ids` as being read by the caller, who passes what this returns
        to `unclaim` when it is stored (or the read failed); None if another request has
        claimed it already (or a prefix of the same length and hash: that read then simply
        claims nothing)."""
        if not self.enabled:
            return None
        key = (len(ids), int(prefix_hashes(ids)[-1]))
        if key in self._claims:
            return None
        future = asyncio.get_running_loop().create_future()
        self._claims[key] = (ids.copy(), future)
        self._claim_lengths[len(ids)] = self._claim_lengths.get(len(ids), 0) + 1
        return key, future

    def unclaim(self, claim: tuple[tuple[int, int], asyncio.Future] | None) -> None:
        if claim is None:
            return
        key, future = claim
        claimed = self._claims.get(key)
        if claimed is not None and claimed[1] is future:
            del self._claims[key]
            length = key[0]
            left = self._claim_lengths.pop(length) - 1
            if left:
                self._claim_lengths[length] = left
        if not future.done():
            future.set_result(None)

    # -- inserts --------------------------------------------------------------------------
    def insert(self, tokens: np.ndarray, states: dict[int, np.ndarray]) -> None:
        """Adds the path of `tokens` (TOKEN rows) and `states` by depth (each the state
        before the token at that depth: S(ids[:depth - 1])); what the tree holds already is
        kept. Then evicts down to the budget."""
        if not self.enabled or len(tokens) == 0:
            return
        ids = tokens["id"]
        key = _key(ids)
        node, depth = self.root, 0
        wanted = sorted(d for d in states if 1 < d <= len(tokens))  # depth 1: start state
        path = []
        while depth < len(tokens):
            child = node.children.get(int(ids[depth]))
            if child is None:  # the rest is new: a chain of nodes cut at the states' depths
                for end in [d for d in wanted if d > depth] + [len(tokens)]:
                    if end > depth:
                        node = self._add_child(node, tokens[depth:end].copy())
                        path.append(node)
                        depth = end
                break
            matched = _matched(child, ids, key, depth)
            if matched < len(child.edge):
                child = self._split(child, matched)
            path.append(child)
            node, depth = child, child.depth
        for want in wanted:  # a node at each state's depth, splitting edges where needed
            holder = next(p for p in path if p.depth >= want)
            if holder.depth > want:
                holder = self._split(holder, want - holder.parent.depth)
                path.insert(path.index(holder.children[int(ids[want])]), holder)
            if holder.state is None:
                holder.state = states[want]
                self.entries += 1
                self.bytes += states[want].nbytes + ARRAY_BYTES
        for touched in reversed(path):
            self._touch(touched)
        self._evict()
        self._publish()

    def _add_child(self, parent: _Node, edge: np.ndarray) -> _Node:
        child = _Node(parent, edge, parent.depth + len(edge))
        parent.children[int(edge["id"][0])] = child
        self._order[child] = None
        self.nodes += 1
        self.bytes += NODE_BYTES + edge.nbytes + len(child.key)
        return child

    def _split(self, node: _Node, at: int) -> _Node:
        """Cuts `node`'s edge after `at` tokens: returns the new node above it there (as
        the most recently used: an ancestor is never older than its descendants)."""
        parent = node.parent
        middle = _Node(parent, node.edge[:at].copy(), parent.depth + at)
        node.edge = node.edge[at:].copy()
        node.key = node.key[4 * at:]
        parent.children[int(middle.edge["id"][0])] = middle
        middle.children[int(node.edge["id"][0])] = node
        node.parent = middle
        self.nodes += 1
        self.bytes += NODE_BYTES
        self._order[middle] = None
        return middle

    # -- recency and eviction -------------------------------------------------------------
    def _touch(self, node: _Node) -> None:
        self._order.move_to_end(node)

    def _live(self):
        pending = list(self.root.children.values())
        while pending:
            node = pending.pop()
            yield node
            pending.extend(node.children.values())

    def _evict(self) -> None:
        evicted = 0
        while self.bytes > self.budget and self._order:
            node = next(iter(self._order))
            if node.children:  # not a leaf (cannot happen: see the module docstring)
                self._order.move_to_end(node)
                continue
            self._remove_leaf(node)
            evicted += 1
        if evicted and self._metrics is not None:
            self._metrics.prefix_cache_evictions.labels(self._label).inc(evicted)

    def _remove_leaf(self, node: _Node) -> None:
        del node.parent.children[int(node.edge["id"][0])]
        del self._order[node]
        self.nodes -= 1
        self.bytes -= NODE_BYTES + node.edge.nbytes + len(node.key)
        if node.state is not None:
            self.entries -= 1
            self.bytes -= node.state.nbytes + ARRAY_BYTES
            node.state = None

    def clear(self, publish: bool = True) -> None:
        """Empties the tree, unlinking its nodes so that their memory goes now, not at the
        next full garbage collection (parents and children refer to each other)."""
        for node in self._order:
            node.parent, node.children, node.state = None, {}, None
        self.root.children.clear()
        self._order.clear()
        self.bytes = self.nodes = self.entries = 0
        if publish:
            self._publish()

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.prefix_cache_bytes.labels(self._label).set(self.bytes)
            self._metrics.prefix_cache_entries.labels(self._label).set(self.entries)


def _matched(child: _Node, ids: np.ndarray, key: bytes, depth: int) -> int:
    """How many of `child`'s edge tokens `ids` has from `depth` (`key`: ids as bytes): one
    byte comparison when all, numpy only to find where a partial match ends."""
    if key.startswith(child.key, 4 * depth):
        return len(child.edge)
    ahead = ids[depth: depth + len(child.edge)]
    same = child.edge["id"][: len(ahead)] == ahead
    return len(ahead) if same.all() else int(np.argmin(same))


def _key(ids: np.ndarray) -> bytes:
    return np.ascontiguousarray(ids, "<i4").tobytes()

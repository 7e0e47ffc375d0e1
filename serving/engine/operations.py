"""What requests compute, in terms of token ids and states, through a model's scheduler.

Long inputs run in chunks of `chunk_tokens` steps with the state carried, so one request's
memory and its share of a batch stay bounded whatever its length.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from serving.engine.prefix_cache import token_rows
from serving.engine.repository import LoadedModel
from serving.model.sampler import most_likely


@dataclass
class Advance:
    """The result of reading tokens from a state."""

    state: np.ndarray  # [L, S]
    next_logprobs: np.ndarray | None  # LM: [V] after the last token
    outputs: np.ndarray  # LM: log-probs of the read tokens [n]; tagger [n, C]; classifier [C]
    previous: np.ndarray | None = None  # LM, if asked: the state before the last token


async def run_chunks(model: LoadedModel, tokens: np.ndarray, state: np.ndarray,
                     targets: np.ndarray | None, chunk: int, key: str | None = None) -> Advance:
    """Reads `tokens` from `state` (a bidirectional encoder: whole, from no state). `key`:
    the session stepping, for the scheduler's batch filling (batch_fill.py)."""
    if model.task != "lm" and not model.runtime.incremental:
        result = await model.scheduler.run(tokens, None)
        return Advance(state, None, result.outputs)
    pieces = []
    next_logprobs = None
    for start in range(0, len(tokens), chunk):
        end = start + chunk
        result = await model.scheduler.run(tokens[start:end], state,
                                           None if targets is None else targets[start:end],
                                           key)
        state, next_logprobs = result.state, result.next_logprobs
        pieces.append(result.outputs)
    outputs = pieces[-1] if model.task == "classify" else np.concatenate(pieces)
    return Advance(state, next_logprobs, outputs)


@dataclass
class Read:
    """Tokens read from the start state under the scoring convention: per token (TOKEN
    rows of prefix_cache.py) log P(ids[i] | <eos> ids[:i]) and the most likely token at
    position i with its log-prob (id -1 where the graph gives none)."""

    tokens: np.ndarray
    before_last: np.ndarray | None  # S(<eos> ids[:-1]), if asked for
    computed: int  # tokens run through the network for it

    @property
    def logprobs(self) -> np.ndarray:
        return self.tokens["logprob"]

    @property
    def has_greedy(self) -> bool:
        return bool(len(self.tokens)) and bool((self.tokens["greedy_id"] >= 0).all())


# how many times a read waits for other requests' claims before reading for itself
MAX_CLAIM_WAITS = 3
# a read that shares at least this many tokens with the tree beyond its deepest state
# (a system prompt that earlier chats continued differently) stores a state where it
# leaves the tree, for the next request there; a shorter branch is not worth a state
MIN_BRANCH_TOKENS = 16


async def read(model: LoadedModel, ids: np.ndarray, chunk: int, *, store_end: bool,
               need_state: bool = False) -> Read:
    """Reads `ids` (at least one) from the start state through the model's prefix cache:
    only what extends the longest cached prefix with a state runs, in pieces of at most
    `chunk` tokens that end at multiples of the cache's interval (each such state is
    stored). `store_end`: the state before the last token is stored too (the end of a
    prompt, a prefix, a scored context); `need_state`: it is returned (Read.before_last).
    Where the read leaves the tree after MIN_BRANCH_TOKENS or more tokens it shares with it
    beyond its deepest state, a state is stored too. A read that another request is
    computing a longer prefix of waits for its entry."""
    cache = model.prefix_cache
    n = len(ids)
    waits = 0
    while True:
        hit = cache.lookup(ids)
        if hit.known == n and (not need_state or hit.state_depth == n):
            cache.note_lookup(n - 1, n - 1)
            await asyncio.sleep(0)  # a request of many cached reads gives the loop turns
            return Read(hit.tokens, hit.state if need_state else None, 0)
        claimed = (cache.claimed_beyond(ids, hit.state_depth)
                   if waits < MAX_CLAIM_WAITS else None)
        if claimed is None:
            break
        waits += 1
        await asyncio.shield(claimed)  # then look again: its entry is in the tree
    depth, state = hit.state_depth, hit.state
    cache.note_lookup(n - 1, depth - 1)
    claim = cache.claim(ids) if store_end and n > depth else None
    try:
        pieces, states = [hit.tokens[:depth]], {}
        interval = cache.interval
        branch = hit.known if depth + MIN_BRANCH_TOKENS <= hit.known < n else 0
        at = depth
        while at < n:
            stop = min(n, at + chunk, (at // interval + 1) * interval)
            if at < branch < stop:
                stop = branch
            result = await model.scheduler.run(ids[at - 1 : stop - 1], state, ids[at:stop])
            state = result.state
            pieces.append(token_rows(ids[at:stop], result.outputs, result.greedy_ids,
                                     result.greedy_logprobs))
            if stop % interval == 0 or stop == branch or (stop == n and store_end):
                states[stop] = state
            at = stop
        tokens = np.concatenate(pieces)
        cache.insert(tokens, states)
        return Read(tokens, state if need_state else None, n - depth)
    finally:
        cache.unclaim(claim)


async def score(model: LoadedModel, ids: np.ndarray, chunk: int,
                store_end: bool = False) -> Read:
    """log P(ids[i] | <eos>, ids[:i]) from the start: the scoring convention (the caller
    appends `<eos>` to ids to have it scored), through the prefix cache."""
    return await read(model, ids, chunk, store_end=store_end)


async def score_ranked(model: LoadedModel, ids: np.ndarray, k: int
                       ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """The scoring convention's log-probs of `ids` and, at each position, the k most likely
    tokens with theirs. The graph gives a whole distribution only after a row's last
    token, so the tokens are read one step at a time (each step batched with everyone
    else's): len(ids) - 1 calls in sequence instead of one. A token's log-prob and its
    alternatives come from the same distribution, so a token that is the most likely has
    exactly the first alternative's log-prob."""
    state, next_logprobs = model.start_state, model.start_logprobs
    logprobs, ranked = [], []
    for position, token in enumerate(ids.tolist()):
        logprobs.append(float(next_logprobs[token]))
        ranked.append(most_likely(next_logprobs, k))
        if position + 1 < len(ids):
            result = await model.scheduler.run(np.array([token], np.int64), state,
                                               np.zeros(1, np.int64))
            state, next_logprobs = result.state, result.next_logprobs
    return logprobs, ranked


async def read_prompt(model: LoadedModel, ids: np.ndarray, chunk: int) -> Advance:
    """The state and next-token distribution after `<eos>` + ids. They start from the
    model's start point (after `<eos>`, computed when it was loaded), so an empty prompt
    needs no call before its first token. Otherwise the prompt is read through the prefix
    cache up to its last token (that state is stored: a later prompt extending this one
    starts there), then the last token runs alone, giving the state after the prompt and
    its next-token distribution; `previous` is the state before the last token (a state
    token's)."""
    state, next_logprobs = model.start_state, model.start_logprobs
    if len(ids) == 0:
        return Advance(state, next_logprobs, np.zeros(0, np.float32))
    prompt = await read(model, ids, chunk, store_end=True, need_state=True)
    last = await model.scheduler.run(ids[-1:], prompt.before_last, np.zeros(1, np.int64))
    return Advance(last.state, last.next_logprobs, prompt.logprobs.astype(np.float32),
                   prompt.before_last)


async def advance(model: LoadedModel, state: np.ndarray, next_logprobs: np.ndarray | None,
                  ids: np.ndarray, chunk: int, keep_previous: bool = False,
                  key: str | None = None) -> Advance:
    """A session step: reads only `ids` from the stored state. For a language model the
    first token's log-prob comes from the stored next-token distribution, so the network
    runs exactly len(ids) tokens. `keep_previous` (for state tokens) also returns the
    state before the last token: free for one token, otherwise one more row beside this
    step in the same batched call."""
    if model.task != "lm":
        return await run_chunks(model, ids, state, None, chunk, key)
    targets = np.concatenate([ids[1:], [0]]).astype(np.int64)
    previous = state
    if keep_previous and len(ids) > 1:
        result, before = await asyncio.gather(
            run_chunks(model, ids, state, targets, chunk, key),
            run_chunks(model, ids[:-1], state, targets[:-1], chunk))
        previous = before.state
    else:
        result = await run_chunks(model, ids, state, targets, chunk, key)
    logprobs = np.concatenate([[next_logprobs[ids[0]]], result.outputs[:-1]])
    return Advance(result.state, result.next_logprobs, logprobs.astype(np.float32),
                   previous if keep_previous else None)


async def resume(model: LoadedModel, state: np.ndarray, last_token: int) -> Advance:
    """A language model session from a state token: reads its last token again from the
    state before it, which restores the state and the next-token distribution."""
    token = np.array([last_token], np.int64)
    return await run_chunks(model, token, state, np.zeros(1, np.int64), 1)


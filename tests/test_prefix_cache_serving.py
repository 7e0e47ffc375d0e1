"""The prefix cache in a running server: the same numbers and tokens with it on, off, and
so small that it evicts all the time, under concurrency; exactly the tokens it spares
not run; its metrics; and a sequence's numbers that do not depend on its batch."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serving_helpers import RunningServer

from serving.model.runtime import ModelRuntime

MODEL = "demo-lm"
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def servers(model_repository):
    on = RunningServer(model_repository, prefix_cache_interval=16)
    tiny = RunningServer(model_repository, prefix_cache_mib=0.06, prefix_cache_interval=8)
    off = RunningServer(model_repository, prefix_cache_mib=0)
    yield {"on": on, "tiny": tiny, "off": off}
    for server in (on, tiny, off):
        server.stop()


@pytest.fixture(scope="module")
def vocab_size(model_repository) -> int:
    return len(ModelRuntime(model_repository / MODEL / "1").vocab)


def workload(vocab: int, seed: int = 0) -> list[tuple]:
    """Requests that share prefixes, as a harness's and a chat front's do: a few stems,
    each extended many ways."""
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    stems = [ids(rng.randrange(2, 40)) for _ in range(5)]
    requests = []
    for number in range(60):
        stem = rng.choice(stems)
        tail = ids(rng.randrange(0, 12))
        kind = rng.choice(["score", "score_open", "complete", "session", "likelihood"])
        if kind == "likelihood":
            requests.append((kind, stem, [ids(rng.randrange(1, 6)) for _ in range(4)]))
        elif kind == "session":
            requests.append((kind, stem + tail, ids(rng.randrange(1, 5))))
        elif kind == "complete":
            requests.append((kind, stem + tail, number))
        else:
            requests.append((kind, stem + tail, None))
    return requests


def run(server: RunningServer, request: tuple):
    client = server.client
    kind, ids, extra = request
    if kind in ("score", "score_open"):
        (score,) = client.score(MODEL, [ids], add_eos=kind == "score")
        return [t.logprob for t in score.tokens], [t.id for t in score.tokens]
    if kind == "complete":
        events = list(client.complete(MODEL, ids, seed=extra, max_tokens=6, temperature=1.0))
        return ([e.token.logprob for e in events if e.token],
                [e.token.id for e in events if e.token])
    if kind == "session":
        opened = client.create_session(MODEL, ids, top_k=3)
        step = client.append(opened.session_id, extra, top_k=3)
        client.close_session(opened.session_id)
        return ([t.logprob for t in opened.tokens] + [t.logprob for t in step.tokens]
                + [t.logprob for t in opened.next_tokens + step.next_tokens],
                [t.id for t in opened.next_tokens + step.next_tokens])
    results = client.loglikelihood(MODEL, [(ids, tail) for tail in extra])
    return ([v for r in results for v in [r.logprob, *r.token_logprobs]],
            [int(r.is_greedy) for r in results])


def test_the_same_numbers_with_the_cache_on_off_and_evicting(servers, vocab_size):
    requests = workload(vocab_size)
    results = {}
    for name, server in servers.items():
        with ThreadPoolExecutor(12) as pool:  # twice: the second round finds a warm cache
            results[name] = [list(pool.map(run, [server] * len(requests), requests))
                             for _ in range(2)]
    for name in ("on", "tiny"):
        for got, want in zip(sum(results[name], []), sum(results["off"], []), strict=True):
            assert got[1] == want[1]  # the same tokens sampled, the same greedy verdicts
            assert np.allclose(got[0], want[0], rtol=0, atol=TOLERANCE)
    on, tiny = servers["on"], servers["tiny"]
    assert on.metric("recur_prefix_cache_hit_tokens_total", model=f"{MODEL}/1") > 0
    assert tiny.metric("recur_prefix_cache_evictions_total", model=f"{MODEL}/1") > 0
    assert tiny.metric("recur_prefix_cache_bytes", model=f"{MODEL}/1") <= 0.06 * (1 << 20)
    assert servers["off"].metric("recur_prefix_cache_lookups_total", model=f"{MODEL}/1") == 0


def test_a_read_runs_only_what_extends_the_cached_prefix(servers, vocab_size):
    server = servers["on"]
    label = f"{MODEL}/1"
    rng = np.random.default_rng(5)
    context = rng.integers(3, vocab_size, 10).tolist()
    more = rng.integers(3, vocab_size, 5).tolist()

    def counters():
        return (server.metric("recur_executed_tokens_total", model=label),
                server.metric("recur_prefix_cache_hit_tokens_total", model=label),
                server.metric("recur_prefix_cache_lookup_tokens_total", model=label),
                server.metric("recur_prefix_cache_entries", model=label))

    def moved(before):
        return tuple(after - was for after, was in zip(counters(), before, strict=True))

    before = counters()
    (first,) = server.client.score(MODEL, [context], add_eos=False)
    # after <eos> (the start state), the tokens up to the last one run; its end is stored
    assert moved(before) == (9, 0, 9, 1)
    before = counters()
    (longer,) = server.client.score(MODEL, [context + more], add_eos=False)
    # from the state before the context's last token: that token and four of the five
    assert moved(before) == (5, 9, 14, 1)
    assert [t.logprob for t in longer.tokens][:10] == [t.logprob for t in first.tokens]
    before = counters()
    (again,) = server.client.score(MODEL, [context + more], add_eos=False)
    assert moved(before) == (0, 14, 14, 0)  # every token's values are in the tree
    assert again == longer
    before = counters()
    events = list(server.client.complete(MODEL, context, max_tokens=1, seed=3))
    assert moved(before)[:2] == (1, 9)  # only the prompt's last token runs
    assert events[0].token is not None

    # long inputs leave a state every `interval` (16) tokens
    document = rng.integers(3, vocab_size, 40).tolist()
    before = counters()
    server.client.score(MODEL, [document])  # add_eos: the end is not a context
    assert moved(before)[3] == 2  # at 16 and 32
    before = counters()
    other = document[:35] + [(document[35] + 1) % vocab_size or 3]
    server.client.score(MODEL, [other], add_eos=False)
    assert moved(before)[:2] == (4, 31)  # from the state at 32: tokens 32 to 35


def test_prompts_that_share_a_system_prompt_share_its_state(model_repository, vocab_size):
    """The second chat leaves the tree where the system prompt it shares with the first
    ends, and stores a state there; the third runs only from there."""
    label = f"{MODEL}/1"
    rng = np.random.default_rng(11)
    system = rng.integers(3, vocab_size, 40).tolist()
    turns = [[3 + i] + rng.integers(3, vocab_size, 5).tolist() for i in range(3)]
    server = RunningServer(model_repository)  # the default interval (256): no state at 16
    try:
        ran = []
        for turn in turns:
            before = server.metric("recur_executed_tokens_total", model=label)
            list(server.client.complete(MODEL, system + turn, max_tokens=1, seed=0))
            ran.append(server.metric("recur_executed_tokens_total", model=label) - before)
    finally:
        server.stop()
    # the third: from the state before the system prompt's last token, six, then its last
    assert ran == [46, 46, 7]


def test_concurrent_requests_for_one_prompt_read_it_once(servers, vocab_size):
    server = servers["on"]
    label = f"{MODEL}/1"
    prompt = np.random.default_rng(8).integers(3, vocab_size, 600).tolist()
    before = server.metric("recur_executed_tokens_total", model=label)
    with ThreadPoolExecutor(12) as pool:
        streams = list(pool.map(lambda seed: list(server.client.complete(
            MODEL, prompt, max_tokens=1, seed=seed)), range(12)))
    assert all(events[-1].finish_reason for events in streams)
    # one read of the prompt; the others wait for its entry and run only its last token
    assert server.metric("recur_executed_tokens_total", model=label) - before == 600 + 11


def test_a_sequence_does_not_depend_on_its_batch(model_repository):
    """Batch invariance: a row's log-probs, next-token distribution, greedy tokens and
    state are those it has alone, whatever rows (and padding) share its ONNX Runtime
    call, so an evaluation's numbers do not change with the server's load."""
    runtime = ModelRuntime(model_repository / MODEL / "1")
    rng = np.random.default_rng(0)
    vocab, layers, size = len(runtime.vocab), runtime.layers, runtime.state_size
    worst = 0.0
    for _ in range(30):
        length = int(rng.integers(1, 40))
        tokens = rng.integers(0, vocab, length)
        targets = rng.integers(0, vocab, length)
        state = rng.normal(0, 0.5, (layers, 1, size)).astype(np.float32)
        alone = runtime.run_lm(tokens[None], np.array([length]), state, targets[None])
        batch = int(rng.integers(2, 65))
        row = int(rng.integers(0, batch))
        lengths = rng.integers(1, 60, batch)
        lengths[row] = length
        width = int(lengths.max())
        all_tokens = rng.integers(0, vocab, (batch, width))
        all_targets = rng.integers(0, vocab, (batch, width))
        all_tokens[row, :length], all_targets[row, :length] = tokens, targets
        states = rng.normal(0, 0.5, (layers, batch, size)).astype(np.float32)
        states[:, row] = state[:, 0]
        shared = runtime.run_lm(all_tokens, lengths, states, all_targets)
        pairs = [(alone.token_logprobs[0], shared.token_logprobs[row, :length]),
                 (alone.next_logprobs[0], shared.next_logprobs[row]),
                 (alone.state.numpy()[:, 0], shared.state.numpy()[:, row]),
                 (alone.greedy_logprobs[0], shared.greedy_logprobs[row, :length])]
        worst = max(worst, *(float(np.abs(a - b).max()) for a, b in pairs))
        assert np.array_equal(alone.greedy_tokens[0], shared.greedy_tokens[row, :length])
    assert worst <= TOLERANCE, worst

"""Batch filling (serving/engine/batch_fill.py): batches wait for the sessions just answered,
never for a lone session or one that left."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.engine.batch_fill import (
    INITIAL_ROUND_TRIP_S,
    MAX_WINDOW_S,
    PROBE_EVERY,
    Returning,
)
from serving.engine.metrics import Metrics
from serving.engine.scheduler import BatchLimits, Scheduler, Step
from serving.model.runtime import ModelRuntime
from tests.serving_helpers import RunningServer


def test_returning_counts_sessions_answered_within_the_window():
    returning = Returning()
    window = returning.window_s
    returning.answered("a", 0.0)
    returning.answered("b", 0.0002)
    assert returning.expected(0.0003) == 2
    returning.came_back("a", 0.0004)  # back: no longer expected, its round trip measured
    assert returning.expected(0.0005) == 1
    assert returning.round_trip_s < INITIAL_ROUND_TRIP_S
    assert returning.expected(0.0002 + returning.window_s + 1e-9) == 0  # b went quiet
    assert len(returning) == 0
    returning.answered("c", 1.0)
    returning.forget("c")  # closed: not waited for
    assert returning.expected(1.0) == 0
    assert window <= MAX_WINDOW_S


def test_a_late_return_is_not_a_round_trip():
    returning = Returning()
    returning.answered("a", 0.0)
    returning.came_back("a", 10.0)  # a new turn of the conversation, minutes later
    assert returning.round_trip_s == INITIAL_ROUND_TRIP_S


def test_the_round_trip_estimate_grows_back():
    """Gaps longer than the current window still count (up to MAX_WINDOW_S), so a run of
    quick returns does not switch the measurement off for slower clients."""
    returning, now = Returning(), 0.0
    for _ in range(50):  # quick returns: the estimate falls far below 1 ms
        returning.answered("a", now)
        now += 1e-5
        returning.came_back("a", now)
    assert returning.round_trip_s < 1e-4
    for _ in range(50):  # then 8 ms round trips, beyond the window the estimate gave
        returning.answered("a", now)
        now += 0.008
        returning.came_back("a", now)
    assert returning.round_trip_s > 0.006


def test_waits_that_bring_nothing_stop_but_are_retried():
    returning = Returning()
    assert returning.worth_waiting()
    returning.waited(0)  # a wait that brought no step
    chances = [returning.worth_waiting() for _ in range(3 * PROBE_EVERY)]
    assert chances.count(True) == 3  # one probe in PROBE_EVERY
    for _ in range(5):
        returning.waited(6)  # the probes paid: waiting is on again
    assert all(returning.worth_waiting() for _ in range(10))


def test_answers_drop_stale_entries():
    returning = Returning()
    for i in range(1000):  # sessions that never come back (expired, went quiet)
        returning.answered(f"s{i}", i * 1.0)
    assert len(returning) == 1


@settings(derandomize=True, deadline=None, max_examples=200)
@given(st.lists(st.tuples(st.sampled_from("abcdef"), st.booleans(),
                          st.floats(0, 0.002)), max_size=60))
def test_expected_is_the_answered_keys_not_back_within_the_window(events):
    """Against a plain model: a dict of each key's last answer, minus keys that came back
    after it, counted within the window as it stands when asked."""
    returning, model, now = Returning(), {}, 0.0
    for key, answered, gap in events:
        now += gap
        if answered:
            returning.answered(key, now)
            model[key] = now
        else:
            returning.came_back(key, now)
            model.pop(key, None)
        window = returning.window_s
        assert returning.expected(now) == sum(1 for t in model.values() if t >= now - window)
        model = {k: t for k, t in model.items() if t >= now - window}


@pytest.fixture(scope="module")
def runtime(model_repository):
    return ModelRuntime(model_repository / "demo-lm" / "1")


def _closed_loop(runtime: ModelRuntime, limits: BatchLimits, sessions: int, turns: int,
                 delays: list[int], close_after: int | None = None
                 ) -> tuple[list[int], Metrics, list[float]]:
    """`sessions` keyed sessions stepping one token per turn, session i coming back after
    delays[i % len(delays)] loop iterations (its "round trip"); with `close_after`, all but
    session 0 close after that many turns. Returns the rows of every ONNX Runtime call, as
    the runtime ran them, the scheduler's metrics, and the count of fill waits so far as
    session 0 saw it before each of its turns."""
    rows: list[int] = []
    probes: list[float] = []
    run_lm = runtime.run_lm

    def recording(tokens, *args, **kwargs):
        rows.append(len(tokens))
        return run_lm(tokens, *args, **kwargs)

    metrics = Metrics()

    async def main() -> None:
        scheduler = Scheduler(runtime, "demo-lm/1", limits, metrics)
        scheduler.start()
        state = runtime.initial_state(1)[:, 0]

        async def session(index: int) -> None:
            key = f"s{index}"
            for turn in range(turns):
                if close_after is not None and turn == close_after:
                    if index > 0:
                        scheduler.returning.forget(key)  # the session closed
                        return
                    await asyncio.sleep(0.01)  # until the others have closed
                if index == 0:
                    probes.append(_waits(metrics))
                tokens = np.array([2 + (index + turn) % 5], np.int64)
                await scheduler.run(tokens, state, tokens, key=key)
                scheduler.answered(key)  # as the engine marks a finished Append
                for _ in range(delays[index % len(delays)]):
                    await asyncio.sleep(0)

        try:
            await asyncio.gather(*(session(i) for i in range(sessions)))
        finally:
            await scheduler.close()

    runtime.run_lm = recording
    try:
        asyncio.run(main())
    finally:
        runtime.run_lm = run_lm
    return rows, metrics, probes


def _waits(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("recur_batch_fill_wait_seconds_count",
                                             {"model": "demo-lm/1"}) or 0.0


def test_batches_wait_for_sessions_coming_back(runtime):
    staggered = [0, 1, 2, 3, 5, 8]
    filled, metrics, _ = _closed_loop(runtime, BatchLimits(max_fill_wait_s=1.0,
                                                        max_inline_step_s=0.0),
                                   12, 20, staggered)
    unfilled, off, _ = _closed_loop(runtime, BatchLimits(max_fill_wait_s=0.0,
                                                      max_inline_step_s=0.0),
                                 12, 20, staggered)
    assert sum(filled) == sum(unfilled) == 12 * 20  # every step ran exactly once
    # after the first turn (arrivals not yet known), calls run all twelve (a slow moment
    # of a shared machine may let a wait's budget pass before a straggler comes)
    assert filled[-19:].count(12) >= 15, filled
    # without it the stragglers run in calls of their own
    assert len(unfilled) > len(filled) and min(unfilled) < 12, unfilled
    assert _waits(metrics) > 0 and _waits(off) == 0


def test_a_lone_session_never_waits(runtime):
    rows, metrics, _ = _closed_loop(runtime, BatchLimits(max_fill_wait_s=1.0), 1, 30, [3])
    assert rows == [1] * 30
    assert _waits(metrics) == 0


def test_one_client_stepping_sessions_in_turn_stops_waiting(runtime):
    """A client that steps sessions A, B, A, B... sends B only once A is answered: B is
    "expected" while A waits, and would be waited for at every step; waits that bring
    nothing stop (one probe in PROBE_EVERY chances)."""
    metrics = Metrics()

    async def main() -> None:
        scheduler = Scheduler(runtime, "demo-lm/1", BatchLimits(max_fill_wait_s=1.0),
                              metrics)
        scheduler.start()
        state = runtime.initial_state(1)[:, 0]
        try:
            for turn in range(200):
                key = "ab"[turn % 2]
                tokens = np.array([3], np.int64)
                await scheduler.run(tokens, state, tokens, key=key)
                scheduler.answered(key)
        finally:
            await scheduler.close()

    asyncio.run(main())
    assert 1 <= _waits(metrics) <= 2 + 200 // PROBE_EVERY


def test_sessions_that_closed_are_not_waited_for(runtime):
    # eleven of twelve sessions close after 3 turns; the last steps on alone, never waiting
    rows, metrics, probes = _closed_loop(runtime, BatchLimits(max_fill_wait_s=1.0), 12, 10,
                                         [0, 1, 2, 3, 5, 8], close_after=3)
    assert sum(rows) == 12 * 3 + 7 and rows[-7:] == [1] * 7
    assert probes[3] > 0  # they did wait while together
    assert probes[3:] == [probes[3]] * 7


def test_the_engine_marks_whole_appends_answered(model_repository, tmp_path):
    """Through a real server with state tokens on: a session's Append of several tokens
    runs two chains (the tokens, and all but the last for the state token) that may land
    in different calls; the session is expected back only once its Append is answered, so
    a lone session never waits, and a closed one (or a V2 sequence ended) is forgotten."""
    keys = tmp_path / "keys"
    keys.write_text("k" * 32 + "\n")
    server = RunningServer(model_repository, state_token_keys=str(keys))
    try:
        client = server.client
        scheduler = server.server.engine.model("demo-lm").scheduler
        session = client.create_session("demo-lm", [5])
        for length in (2, 4, 2, 8, 3, 1, 2):  # two chains in different length buckets
            session = client.append(session.session_id, [7] * length)
        assert server.metric("recur_batch_fill_wait_seconds_count", model="demo-lm/1") == 0
        assert len(scheduler.returning) == 1  # answered, not back yet
        client.close_session(session.session_id)
        assert len(scheduler.returning) == 0
    finally:
        server.stop()


def test_a_lone_step_runs_on_the_loop_unless_sessions_paying_to_wait_for_are_due(runtime):
    """The loop's thread runs a lone quick step, except while other sessions are expected
    back and waiting for them has been paying (the step would then hold their requests
    up); sessions that do not come back soon (waits not paying) do not stop it."""
    async def main() -> list[bool]:
        scheduler = Scheduler(runtime, "demo-lm/1", BatchLimits(max_inline_step_s=1.0),
                              Metrics())
        scheduler.lone_step_s = 1e-4  # measured quick
        state = runtime.initial_state(1)[:, 0]
        step = [Step(np.array([3]), state, np.array([3]),
                     asyncio.get_running_loop().create_future(), 0.0, key="s")]
        seen = [scheduler._inline(step)]
        scheduler.returning.answered("other", time.perf_counter())
        scheduler.returning.gain_steps = 5.0  # waits for sessions have been paying
        seen.append(scheduler._inline(step))
        scheduler.returning.gain_steps = 0.0  # they have not
        seen.append(scheduler._inline(step))
        await scheduler.close()
        return seen

    assert asyncio.run(main()) == [True, False, True]

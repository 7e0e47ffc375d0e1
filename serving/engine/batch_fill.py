"""When a batch should wait to fill: the sessions that are mid-conversation.

A session's client sends its next one-token step soon after its last was answered (its
round trip: the response, the client's work, the next request). With many sessions
stepping, a batch taken the moment one step is pending runs a handful of rows, and each
ONNX Runtime call streams all the weights whatever its rows. So the scheduler remembers
the sessions whose requests were answered and that have not come back yet (`Returning`;
the engine marks a session answered when its whole request, an Append or a V2 sequence
step, is done, never between its pieces, so a session with a step in flight is never
waited for), and before a call waits for them, up to a bound:

- a session counts as returning for a while after its answer: four times the round trip
  measured for the sessions that did come back (`window_s`, at most 50 ms), so a session
  that stopped (its client gone quiet) stops counting soon, and a closed one at once;
- a batch of one-token steps waits while fewer than `max_batch_size` steps are pending
  and at least half as many sessions are expected as steps are pending (a wait that
  cannot grow the batch by half is not worth its delay to the steps already there: eight
  completion streams do not wait for one session);
- it waits until they have all come, or until the budget has passed since its oldest
  step was queued: two measured round trips or one measured call of one-token steps,
  whichever is longer, and never more than the scheduler's `max_fill_wait_s` (5 ms by
  default). Two round trips bring back nearly every session that is coming; a call's
  time is what one more call would cost anyway, so such a wait at worst doubles a step's
  time;
- a lone session never waits: its own step is the one it would wait for;
- waits must pay: the scheduler records how many steps each wait brought, and while the
  recent average is under one step (one client stepping several sessions in turn, each
  sent only after the last is answered; sessions whose round trips outlast the budget)
  it stops waiting, trying one wait in PROBE_EVERY chances to notice when they would pay
  again.

Measured on the two cores of the benchmark machine, the grpc.aio clients on the same
cores (bench/steps.py's workload, the wait on against off in alternating rounds, two
runs): 8 sessions of one-token Appends ran 1.8-2.0x the tokens/s (calls of 7.3-7.5 rows
against 1.3, when without the wait each lone step ran on the loop's thread); 64 sessions
ran 1.06-1.07x (28 rows against 7-17), the event loop's per-request work (about 0.45 ms,
most of it gRPC's) being what limits them.
"""

from __future__ import annotations

# how many measured round trips a session counts as returning after its answer
WINDOW_ROUND_TRIPS = 4
# the round trip assumed before one is measured, and the longest a session counts as
# returning however slow its client
INITIAL_ROUND_TRIP_S = 0.001
MAX_WINDOW_S = 0.05
# weight of the newest round trip in the running estimate
SMOOTHING = 0.1
# a wait must bring at least this many steps on average (a running mean, newest weighted
# GAIN_SMOOTHING) for batches to go on waiting; while they do not, one chance to wait in
# PROBE_EVERY is still taken
MIN_GAIN_STEPS = 1.0
GAIN_SMOOTHING = 0.2
PROBE_EVERY = 64


class Returning:
    """Sessions answered and not yet back, oldest answer first (a dict keeps the order in
    which keys were inserted, and an answer re-inserts its key at the end)."""

    def __init__(self) -> None:
        self._answered: dict[str, float] = {}  # session key -> when its step was answered
        self.round_trip_s = INITIAL_ROUND_TRIP_S
        self.gain_steps = MIN_GAIN_STEPS  # steps a wait brought, a running mean
        self._passed = 0  # chances to wait passed up since waits stopped paying

    def __len__(self) -> int:
        return len(self._answered)

    @property
    def window_s(self) -> float:
        return min(MAX_WINDOW_S, WINDOW_ROUND_TRIPS * self.round_trip_s)

    def budget_s(self, call_s: float) -> float:
        """How long a batch may wait for the sessions expected back (before the
        scheduler's own bound): two round trips, or one call of `call_s`, the longer."""
        return max(call_s, 2 * self.round_trip_s)

    @property
    def paying(self) -> bool:
        """Whether recent waits brought steps (the sessions expected do come back soon)."""
        return self.gain_steps >= MIN_GAIN_STEPS

    def worth_waiting(self) -> bool:
        """Whether to take this chance to wait: yes while waits pay, else one in
        PROBE_EVERY."""
        if self.paying:
            return True
        self._passed += 1
        if self._passed >= PROBE_EVERY:
            self._passed = 0
            return True
        return False

    def waited(self, steps: int) -> None:
        """A wait ended with `steps` more steps pending than it began with."""
        self.gain_steps += GAIN_SMOOTHING * (steps - self.gain_steps)

    def answered(self, key: str, now: float) -> None:
        """`key`'s request is done: it is expected back. Entries gone stale are dropped
        here too, so the table holds only sessions answered within the window."""
        self._answered.pop(key, None)
        self._answered[key] = now
        self.expected(now)

    def came_back(self, key: str, now: float) -> None:
        """A step of `key` was queued: it is no longer awaited; its round trip is measured
        if it came back within MAX_WINDOW_S (a later one is a new turn of the
        conversation), whatever the window is now, so the estimate can grow again."""
        answered = self._answered.pop(key, None)
        if answered is not None and (gap := now - answered) <= MAX_WINDOW_S:
            self.round_trip_s += SMOOTHING * (gap - self.round_trip_s)

    def forget(self, key: str) -> None:
        self._answered.pop(key, None)

    def expected(self, now: float) -> int:
        """How many sessions are still expected back: those answered within the window
        (older ones are dropped here)."""
        horizon = now - self.window_s
        answered = self._answered
        while answered:
            key, when = next(iter(answered.items()))
            if when >= horizon:
                break
            del answered[key]
        return len(answered)

"""The leaky bucket at the unit: exact retry times, refunds and the sweep.

Time is the ``now`` each call is given, so every number here is exact. These
are the rules any rate-limit backend must keep; test_ratelimit.py checks the
same limits over HTTP.
"""

from __future__ import annotations

import pytest

from login_token_module.ratelimit import Ratelimiter

NOW = 1_700_000_000.0  # a wall-clock time, as the reactor gives


def drain_sweep(limiter: Ratelimiter, now: float) -> int:
    return sum(1 for _ in limiter.sweep(now))


def test_burst_count_actions_are_allowed_then_refused() -> None:
    limiter = Ratelimiter(per_second=0.5, burst_count=3)
    for _ in range(3):
        assert limiter.retry_after_ms("alice", NOW) is None
        limiter.record("alice", NOW)
    assert limiter.retry_after_ms("alice", NOW) == 2000
    assert limiter.retry_after_ms("bob", NOW) is None


@pytest.mark.parametrize(
    ("per_second", "elapsed", "expected_ms"),
    [
        (1 / 60, 0.0, 60_000),  # the default: one token a minute
        (1 / 60, 15.0, 45_000),
        (0.5, 0.0, 2_000),
        (0.5, 1.5, 500),
        (2.0, 0.0, 500),
        (0.5, 1.9999, 1),  # a fraction of a millisecond left rounds up to one
        (1000.0, 0.0, 1),
        (1e7, 0.0, 1),  # never 0 while still refused
    ],
)
def test_retry_after_is_the_time_until_the_next_action_fits(
    per_second: float, elapsed: float, expected_ms: int
) -> None:
    limiter = Ratelimiter(per_second=per_second, burst_count=1)
    limiter.record("alice", NOW)
    assert limiter.retry_after_ms("alice", NOW + elapsed) == expected_ms


def test_waiting_the_retry_time_is_enough() -> None:
    limiter = Ratelimiter(per_second=0.25, burst_count=2)
    for _ in range(3):
        limiter.record("alice", NOW)  # one over the burst (as a racer could)
    retry_after = limiter.retry_after_ms("alice", NOW)
    assert retry_after == 8000
    assert limiter.retry_after_ms("alice", NOW + retry_after / 1000 - 0.01) is not None
    assert limiter.retry_after_ms("alice", NOW + retry_after / 1000) is None


def test_refund_gives_back_exactly_one_action() -> None:
    limiter = Ratelimiter(per_second=0.001, burst_count=3)
    limiter.record("alice", NOW)
    limiter.record("alice", NOW)
    limiter.refund("alice", NOW)
    # One action is still counted: two more fit, the third does not.
    for _ in range(2):
        assert limiter.retry_after_ms("alice", NOW) is None
        limiter.record("alice", NOW)
    assert limiter.retry_after_ms("alice", NOW) == 1_000_000


def test_refunding_the_only_action_forgets_the_key() -> None:
    limiter = Ratelimiter(per_second=0.001, burst_count=1)
    limiter.record("alice", NOW)
    limiter.refund("alice", NOW)
    assert limiter.retry_after_ms("alice", NOW) is None
    assert len(limiter) == 0
    # A refund for a key with nothing counted changes nothing and never goes negative.
    limiter.refund("bob", NOW)
    assert len(limiter) == 0
    limiter.record("bob", NOW)
    assert limiter.retry_after_ms("bob", NOW) == 1_000_000


def test_sweep_keeps_counts_that_have_not_drained() -> None:
    limiter = Ratelimiter(per_second=1.0, burst_count=3)
    for _ in range(3):
        limiter.record("alice", NOW)
    drain_sweep(limiter, NOW + 1)  # two of three actions are still counted
    assert len(limiter) == 1
    assert limiter.retry_after_ms("alice", NOW + 1) is None
    limiter.record("alice", NOW + 1)
    assert limiter.retry_after_ms("alice", NOW + 1) == 1000


def test_sweep_drops_drained_keys_only() -> None:
    limiter = Ratelimiter(per_second=1.0, burst_count=5)
    for _ in range(3):
        limiter.record("old", NOW)
    limiter.record("new", NOW + 2)
    drain_sweep(limiter, NOW + 3)  # both have drained to nothing exactly now
    assert len(limiter) == 0

    limiter.record("old", NOW + 10)
    limiter.record("new", NOW + 10.5)
    drain_sweep(limiter, NOW + 11)
    assert len(limiter) == 1  # "old" drained at NOW + 11, "new" has half an action left
    assert limiter.retry_after_ms("new", NOW + 11) is None


def test_sweep_covers_every_slice() -> None:
    limiter = Ratelimiter(per_second=1.0, burst_count=1)
    count = 12_001
    for i in range(count):
        limiter.record(f"user{i}", NOW)
    limiter.record("late", NOW + 5)
    assert drain_sweep(limiter, NOW + 5) == 3  # slices of 5,000
    assert len(limiter) == 1
    assert limiter.retry_after_ms("late", NOW + 5) == 1000


def test_keys_that_change_between_slices_are_judged_as_they_are_then() -> None:
    """The sweep pauses between slices; a key refunded away or recorded again meanwhile is fine."""
    limiter = Ratelimiter(per_second=1.0, burst_count=1)
    for i in range(5_002):
        limiter.record(f"user{i}", NOW)
    sweep = limiter.sweep(NOW + 5)
    next(sweep)  # the first slice is done: 5,000 keys gone
    assert len(limiter) == 2
    limiter.refund("user5000", NOW + 5)  # gone before the sweep reaches it
    limiter.record("user5001", NOW + 5)  # busy again: no longer drained
    assert list(sweep) == [None]
    assert len(limiter) == 1
    assert limiter.retry_after_ms("user5001", NOW + 5) == 1000

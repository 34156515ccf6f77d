"""A per-key leaky bucket, with Synapse's ``per_second`` / ``burst_count`` meaning.

Each key has a count of recent actions that drains at ``per_second``; an action
is allowed when the count plus one fits within ``burst_count``. Checking and
recording are separate so that a caller can refuse a request without charging
for it. Keys whose count has drained to nothing are dropped by ``sweep``, so
memory follows the number of recently active users, not of all users.
"""

from __future__ import annotations

from collections.abc import Iterator


class Ratelimiter:
    def __init__(self, per_second: float, burst_count: int) -> None:
        self.per_second = per_second
        self.burst_count = burst_count
        # key -> (action count at the time, time in seconds)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _count(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return 0.0
        count, then = entry
        return max(0.0, count - (now - then) * self.per_second)

    def retry_after_ms(self, key: str, now: float) -> int | None:
        """``None`` if one more action is allowed now, else how long until it is."""
        excess = self._count(key, now) + 1 - self.burst_count
        if excess <= 0:
            return None
        return max(1, int(excess / self.per_second * 1000 + 0.999))

    def record(self, key: str, now: float) -> None:
        self._buckets[key] = (self._count(key, now) + 1, now)

    def refund(self, key: str, now: float) -> None:
        """Take back one recorded action (its request failed before doing anything)."""
        count = self._count(key, now) - 1
        if count > 0:
            self._buckets[key] = (count, now)
        else:
            self._buckets.pop(key, None)

    def sweep(self, now: float) -> Iterator[None]:
        """Drop drained keys; yields between slices so the caller can pause."""
        keys = list(self._buckets)
        for start in range(0, len(keys), 5_000):
            for key in keys[start : start + 5_000]:
                entry = self._buckets.get(key)
                if entry is not None and entry[0] - (now - entry[1]) * self.per_second <= 0:
                    del self._buckets[key]
            yield None

    def __len__(self) -> int:
        return len(self._buckets)

"""The in-memory backend: fastest, but everything lives and dies with the process.

Tokens sit in a dict keyed by hash. Beside it, a deque holds the hashes in the
order they were issued; with one lifetime for every token that is also the
order they expire in, so a sweep pops from the left until it meets a live token
and does work in proportion to what it removes, never to what is held. Spent
tokens leave a stale hash in the deque until the sweep passes them. The sweep
works in slices and hands the reactor back between them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from twisted.internet.task import deferLater

from login_token_module.ratelimit import Ratelimiter
from login_token_module.uia import UiaSession, UiaSessions

SWEEP_SLICE = 2_000


class MemoryTokenStore:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._tokens: dict[bytes, tuple[str, int]] = {}
        self._issue_order: deque[bytes] = deque()

    async def add_token(self, token_hash: bytes, user_id: str, expires_at_ms: int) -> None:
        self._tokens[token_hash] = (user_id, expires_at_ms)
        self._issue_order.append(token_hash)

    async def consume_token(self, token_hash: bytes, now_ms: int) -> str | None:
        # pop() is atomic on the reactor thread: a second caller finds nothing.
        entry = self._tokens.pop(token_hash, None)
        if entry is None or entry[1] <= now_ms:
            return None
        return entry[0]

    async def delete_expired(self, now_ms: int) -> int:
        removed = 0
        while True:
            removed_in_slice, done = self._sweep_slice(now_ms)
            removed += removed_in_slice
            if done:
                return removed
            await deferLater(self._reactor, 0, lambda: None)

    def _sweep_slice(self, now_ms: int) -> tuple[int, bool]:
        tokens, order = self._tokens, self._issue_order
        removed = 0
        for _ in range(SWEEP_SLICE):
            if not order:
                return removed, True
            head = order[0]
            entry = tokens.get(head)
            if entry is not None:
                if entry[1] > now_ms:
                    return removed, True
                del tokens[head]
                removed += 1
            order.popleft()
        return removed, False

    async def count_tokens(self) -> int:
        return len(self._tokens)

    async def close(self) -> None:
        self._tokens.clear()
        self._issue_order.clear()


async def _cooperate(reactor: Any, slices: Iterator[None]) -> None:
    """Run a slicing sweep, giving the reactor a turn between slices."""
    for _ in slices:
        await deferLater(reactor, 0, lambda: None)


class MemoryUiaSessionStore:
    """UIA sessions in this process (``UiaSessions``), behind the async Protocol.

    Every call finishes without giving the reactor up, so each is atomic among
    the requests this process serves.
    """

    def __init__(self, reactor: Any, lifetime_seconds: float) -> None:
        self._reactor = reactor
        self.sessions = UiaSessions(lifetime_seconds)

    async def create(self, user_id: str, endpoint: str, now: float) -> UiaSession:
        return self.sessions.create(user_id, endpoint, now)

    async def get(self, session_id: str, now: float) -> UiaSession | None:
        return self.sessions.get(session_id, now)

    async def spend(self, session_id: str) -> UiaSession | None:
        return self.sessions.spend(session_id)

    async def restore(self, session: UiaSession) -> None:
        self.sessions.restore(session)

    async def sweep(self, now: float) -> int:
        before = len(self.sessions)
        await _cooperate(self._reactor, self.sessions.sweep(now))
        return before - len(self.sessions)

    async def count(self) -> int:
        return len(self.sessions)


class MemoryRateLimitStore:
    """Leaky buckets in this process (``Ratelimiter``), behind the async Protocol."""

    def __init__(self, reactor: Any, per_second: float, burst_count: int) -> None:
        self._reactor = reactor
        self.limiter = Ratelimiter(per_second, burst_count)

    async def acquire(self, key: str, now: float) -> int | None:
        retry_after = self.limiter.retry_after_ms(key, now)
        if retry_after is None:
            self.limiter.record(key, now)
        return retry_after

    async def check(self, key: str, now: float) -> int | None:
        return self.limiter.retry_after_ms(key, now)

    async def record(self, key: str, now: float) -> None:
        self.limiter.record(key, now)

    async def refund(self, key: str, now: float) -> None:
        self.limiter.refund(key, now)

    async def sweep(self, now: float) -> int:
        before = len(self.limiter)
        await _cooperate(self._reactor, self.limiter.sweep(now))
        return before - len(self.limiter)

    async def count(self) -> int:
        return len(self.limiter)


class MemoryBackend:
    """Tokens, UIA sessions and rate limits all in this process: one process only."""

    shared = False

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.tokens = MemoryTokenStore(reactor)

    def uia_sessions(self, lifetime_seconds: float) -> MemoryUiaSessionStore:
        return MemoryUiaSessionStore(self._reactor, lifetime_seconds)

    def rate_limiter(self, name: str, per_second: float, burst_count: int) -> MemoryRateLimitStore:
        return MemoryRateLimitStore(self._reactor, per_second, burst_count)

    async def close(self) -> None:
        await self.tokens.close()

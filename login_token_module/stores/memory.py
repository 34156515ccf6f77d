"""The in-memory store: fastest, but tokens live and die with the process.

Tokens sit in a dict keyed by hash. Beside it, a deque holds the hashes in the
order they were issued; with one lifetime for every token that is also the
order they expire in, so a sweep pops from the left until it meets a live token
and does work in proportion to what it removes, never to what is held. Spent
tokens leave a stale hash in the deque until the sweep passes them. The sweep
works in slices and hands the reactor back between them.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.task import deferLater

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

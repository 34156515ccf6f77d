"""Sweeping: the looping call that forgets what has expired.

Expired tokens, token history older than ``history_retention_ms``, expired UIA
sessions and drained rate-limit buckets go; the tokens still outstanding are
counted for the ``outstanding_tokens`` gauge.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from login_token_module.metrics import Metrics
from login_token_module.stores import RateLimitStore, TokenStore, UiaSessionStore

# The module's log lines keep one logger name, whichever of its files writes them.
logger = logging.getLogger("login_token_module.module")


class Sweeping:
    def __init__(
        self,
        *,
        tokens: TokenStore,
        sessions: UiaSessionStore,
        limiters: tuple[RateLimitStore, ...],
        history_retention_ms: int,
        metrics: Metrics,
        now: Callable[[], float],
    ) -> None:
        # ``tokens``: the module's token store, or the hashes of the host's tokens.
        self._tokens = tokens
        self._sessions = sessions
        self._limiters = limiters
        self._history_retention_ms = history_retention_ms
        self._metrics = metrics
        self._now = now

    async def sweep(self) -> None:
        """Drop expired tokens, old token history, expired UIA sessions and drained
        rate-limit buckets; count the tokens still outstanding."""
        now = self._now()
        now_ms = int(now * 1000)
        removed = await self._tokens.delete_expired(now_ms)
        await self._tokens.delete_history(now_ms - self._history_retention_ms)
        await self._sessions.sweep(now)
        for limiter in self._limiters:
            await limiter.sweep(now)
        self._metrics.outstanding_tokens.set(await self._tokens.count_outstanding(now_ms))
        if removed:
            logger.debug("Swept %d expired login tokens", removed)

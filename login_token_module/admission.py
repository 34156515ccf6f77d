"""Admission for expensive work a client can ask for (bcrypt): a bounded queue."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from login_token_module.errors import ServerBusyError

T = TypeVar("T")


class BoundedQueue:
    """Admits at most ``limit`` jobs at once (running or waiting for a thread).

    For expensive work an attacker can ask for (bcrypt): past the limit, :meth:`run`
    raises :class:`ServerBusyError` at once instead of queueing, so the wait of
    everyone else stays bounded whatever the attacker sends.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    async def run(self, job: Callable[[], Awaitable[T]]) -> T:
        if self.in_flight >= self.limit:
            # A queue this full drains in about a second: come back then.
            raise ServerBusyError(1000)
        self.in_flight += 1
        try:
            return await job()
        finally:
            self.in_flight -= 1

"""bcrypt password hashing, always in worker threads of its own.

bcrypt is deliberately slow (tens to hundreds of milliseconds); on the reactor
thread it would stall every other request. It releases the GIL, so the limit
is CPU: a pool as large as Twisted's shared one (10 threads) would let a burst
of logins take every core and starve the reactor. The pool therefore leaves
one core to the reactor. bcrypt only reads the first 72 bytes of a password,
which this host makes explicit rather than letting the library refuse longer
ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import bcrypt

from login_token_module.admission import BoundedQueue
from login_token_module.stores.engines.threads import WorkerPool

T = TypeVar("T")

BCRYPT_MAX_BYTES = 72


def _encode(password: str) -> bytes:
    return password.encode("utf-8")[:BCRYPT_MAX_BYTES]


def hash_password_sync(password: str, rounds: int) -> str:
    return bcrypt.hashpw(_encode(password), bcrypt.gensalt(rounds)).decode("ascii")


def check_password_sync(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(_encode(password), password_hash.encode("ascii"))
    except ValueError:
        return False


def default_hashing_threads() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


# Password checks allowed to wait for a bcrypt thread. At 12 rounds (about 0.25 s a
# check on one core) 16 waiting is about 4 s of work: beyond it a request is refused
# at once (429) instead of joining a queue an attacker keeps full.
DEFAULT_MAX_QUEUED = 16


class PasswordHasher:
    """bcrypt in a bounded pool with a bounded queue.

    ``threads`` run bcrypt; ``max_queued`` more may wait for one. A check beyond
    that raises ServerBusyError at once, so a flood of password checks costs its
    sender a 429 and everyone else nothing more than the queue's bounded wait.
    """

    def __init__(
        self, reactor: Any, rounds: int, threads: int | None = None, max_queued: int = DEFAULT_MAX_QUEUED
    ) -> None:
        self._reactor = reactor
        self._rounds = rounds
        self.threads = threads or default_hashing_threads()
        self.max_queued = max_queued
        self._pool = WorkerPool(reactor, "bcrypt", maxthreads=self.threads)
        self.queue = BoundedQueue(self.threads + max_queued)
        self._dummy_hash: str | None = None

    async def _in_pool(self, func: Callable[..., T], *args: Any) -> T:
        return await self.queue.run(lambda: self._pool.run(func, *args))

    async def hash(self, password: str) -> str:
        return await self._in_pool(hash_password_sync, password, self._rounds)

    async def check(self, password: str, password_hash: str | None) -> bool:
        """Check ``password``; with no hash (unknown user) spend the same time, then fail."""
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash("not a real password")
            await self._in_pool(check_password_sync, password, self._dummy_hash)
            return False
        return await self._in_pool(check_password_sync, password, password_hash)

    def close(self) -> None:
        self._pool.close()

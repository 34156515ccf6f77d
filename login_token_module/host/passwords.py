"""bcrypt password hashing, always in a worker thread.

bcrypt is deliberately slow (tens to hundreds of milliseconds); on the reactor
thread it would stall every other request. bcrypt only reads the first 72
bytes of a password, which this host makes explicit rather than letting the
library refuse longer ones.
"""

from __future__ import annotations

from typing import Any

import bcrypt
from twisted.internet.threads import deferToThreadPool

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


class PasswordHasher:
    def __init__(self, reactor: Any, rounds: int) -> None:
        self._reactor = reactor
        self._rounds = rounds
        self._dummy_hash: str | None = None

    async def hash(self, password: str) -> str:
        result: str = await deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), hash_password_sync, password, self._rounds
        )
        return result

    async def check(self, password: str, password_hash: str | None) -> bool:
        """Check ``password``; with no hash (unknown user) spend the same time, then fail."""
        if password_hash is None:
            if self._dummy_hash is None:
                self._dummy_hash = await self.hash("not a real password")
            await deferToThreadPool(
                self._reactor,
                self._reactor.getThreadPool(),
                check_password_sync,
                password,
                self._dummy_hash,
            )
            return False
        result: bool = await deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), check_password_sync, password, password_hash
        )
        return result

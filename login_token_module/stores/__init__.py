"""Where issued login tokens live until they are spent or expire.

Stores see only token hashes, never tokens. ``consume_token`` is the one
operation that must be atomic: however many requests (or processes) present the
same token at once, at most one of them gets the user back.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

from login_token_module.config import ConfigError, StoreConfig


class TokenStore(Protocol):
    async def add_token(self, token_hash: bytes, user_id: str, expires_at_ms: int) -> None:
        """Remember a freshly minted token until ``expires_at_ms``."""

    async def consume_token(self, token_hash: bytes, now_ms: int) -> str | None:
        """Spend the token: its user if it was live, else ``None``. Never twice."""

    async def delete_expired(self, now_ms: int) -> int:
        """Forget tokens that expired at or before ``now_ms``; how many went."""

    async def count_tokens(self) -> int:
        """How many tokens are held, expired-but-unswept ones included."""

    async def close(self) -> None:
        """Release files and threads; the store is not used afterwards."""


def make_store(config: StoreConfig, reactor: Any, config_directory: str) -> TokenStore:
    """The configured store, ready to use; a path it cannot use is a ConfigError."""
    if config.type == "memory":
        from login_token_module.stores.memory import MemoryTokenStore

        return MemoryTokenStore(reactor)
    from login_token_module.sqlite import unusable_database_reason
    from login_token_module.stores.sqlite import SCHEMA, SqliteTokenStore

    path = config.path
    if path != ":memory:" and not os.path.isabs(path):
        path = os.path.join(config_directory, path)
    # Checked now, at start-up, so a bad path never becomes a 500 per request.
    problem = unusable_database_reason(path, SCHEMA)
    if problem is not None:
        raise ConfigError(["store", "path"], problem)
    return SqliteTokenStore(reactor, path)

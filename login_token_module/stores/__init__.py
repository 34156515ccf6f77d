"""Where issued login tokens live until they are spent or expire.

Stores see only token hashes, never tokens. ``consume_token`` is the one
operation that must be atomic: however many requests (or processes) present the
same token at once, at most one of them gets the user back.
"""

from __future__ import annotations

from typing import Any, Protocol

from login_token_module.config import StoreConfig


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


def make_store(config: StoreConfig, reactor: Any, resolved_path: str) -> TokenStore:
    if config.type == "memory":
        from login_token_module.stores.memory import MemoryTokenStore

        return MemoryTokenStore(reactor)
    from login_token_module.stores.sqlite import SqliteTokenStore

    return SqliteTokenStore(reactor, resolved_path)

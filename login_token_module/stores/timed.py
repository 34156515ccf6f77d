"""Store timings, taken where state is kept.

Each wrapper here stands in front of one store (or the host's token calls) and
records how long each state operation takes in the
``login_token_module_store_duration_seconds`` histogram, under its operation's
name, so the module's flows read as the flows themselves. The names are the
ones operators alert on; an operation without one (creating a UIA session, the
operators' listings) passes straight through, untimed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection
from typing import Protocol

from login_token_module.metrics import timed
from login_token_module.stores import (
    LineageEntry,
    Pairing,
    PairingStore,
    RateLimitStore,
    StartOutcome,
    StateBackend,
    TokenInfo,
    TokenSpend,
    TokenStore,
    UiaSessionStore,
)
from login_token_module.uia import UiaSession

# A rate limiter's name (shared between processes) -> the prefix of its timings' names.
LIMITER_LABELS = {"get_token": "ratelimit", "get_token_failed_auth": "failed_auth"}


class TimedTokenStore:
    def __init__(self, inner: TokenStore) -> None:
        self.inner = inner

    async def add_token(
        self,
        token_hash: bytes,
        user_id: str,
        expires_at_ms: int,
        *,
        device_id: str | None = None,
        issued_at_ms: int | None = None,
    ) -> None:
        await timed(
            "add_token",
            self.inner.add_token(
                token_hash, user_id, expires_at_ms, device_id=device_id, issued_at_ms=issued_at_ms
            ),
        )

    async def spend_token(self, token_hash: bytes, now_ms: int) -> TokenSpend:
        return await timed("spend_token", self.inner.spend_token(token_hash, now_ms))

    async def record_new_device(self, token_hash: bytes, device_id: str) -> None:
        await timed("record_new_device", self.inner.record_new_device(token_hash, device_id))

    async def unspend_token(self, token_hash: bytes, spend: TokenSpend) -> bool:
        return await timed("unspend_token", self.inner.unspend_token(token_hash, spend))

    async def revoke_tokens(
        self, user_id: str, now_ms: int, *, device_id: str | None = None
    ) -> list[TokenInfo]:
        return await timed("revoke", self.inner.revoke_tokens(user_id, now_ms, device_id=device_id))

    async def revoke_fingerprint(self, fingerprint: str, now_ms: int) -> list[TokenInfo]:
        return await timed("revoke", self.inner.revoke_fingerprint(fingerprint, now_ms))

    async def list_tokens(self, now_ms: int, user_id: str | None = None) -> list[TokenInfo]:
        return await self.inner.list_tokens(now_ms, user_id)

    async def lineage(self, user_id: str) -> list[LineageEntry]:
        return await self.inner.lineage(user_id)

    async def count_outstanding(self, now_ms: int) -> int:
        return await timed("count_outstanding", self.inner.count_outstanding(now_ms))

    async def delete_history(self, before_ms: int) -> int:
        return await timed("sweep_history", self.inner.delete_history(before_ms))

    async def delete_expired(self, now_ms: int) -> int:
        return await timed("sweep_tokens", self.inner.delete_expired(now_ms))

    async def count_tokens(self) -> int:
        return await self.inner.count_tokens()

    async def close(self) -> None:
        await self.inner.close()


class TimedUiaSessionStore:
    def __init__(self, inner: UiaSessionStore) -> None:
        self.inner = inner

    async def create(self, user_id: str, endpoint: str, now: float) -> UiaSession:
        return await self.inner.create(user_id, endpoint, now)

    async def get(self, session_id: str, now: float) -> UiaSession | None:
        return await timed("uia_get", self.inner.get(session_id, now))

    async def spend(self, session_id: str) -> UiaSession | None:
        return await timed("uia_spend", self.inner.spend(session_id))

    async def restore(self, session: UiaSession) -> None:
        await timed("uia_restore", self.inner.restore(session))

    async def sweep(self, now: float) -> int:
        return await timed("sweep_uia", self.inner.sweep(now))

    async def count(self) -> int:
        return await self.inner.count()


class TimedRateLimitStore:
    def __init__(self, inner: RateLimitStore, label: str) -> None:
        """``label``: the prefix of this limiter's timings (``ratelimit_acquire``, ...)."""
        self.inner = inner
        self._acquire = f"{label}_acquire"
        self._refund = f"{label}_refund"

    async def acquire(self, key: str, now: float) -> int | None:
        return await timed(self._acquire, self.inner.acquire(key, now))

    async def record(self, key: str, now: float) -> None:
        await self.inner.record(key, now)

    async def refund(self, key: str, now: float) -> None:
        await timed(self._refund, self.inner.refund(key, now))

    async def sweep(self, now: float) -> int:
        # Every limiter's sweep under one name: operators watch the sweep as a whole.
        return await timed("sweep_ratelimits", self.inner.sweep(now))

    async def count(self) -> int:
        return await self.inner.count()


class TimedPairingStore:
    def __init__(self, inner: PairingStore) -> None:
        self.inner = inner

    async def start(self, pairing: Pairing, now_ms: int, max_pending_per_address: int) -> StartOutcome:
        return await timed("pair_start", self.inner.start(pairing, now_ms, max_pending_per_address))

    async def find(self, user_code: str, now_ms: int) -> Pairing | None:
        return await timed("pair_find", self.inner.find(user_code, now_ms))

    async def approve(
        self,
        user_code: str,
        now_ms: int,
        *,
        user_id: str,
        device_id: str | None,
        approver_address: str | None,
        sealed_token: bytes,
        token_hash: bytes,
        token_expires_at_ms: int,
    ) -> Pairing | None:
        return await timed(
            "pair_approve",
            self.inner.approve(
                user_code,
                now_ms,
                user_id=user_id,
                device_id=device_id,
                approver_address=approver_address,
                sealed_token=sealed_token,
                token_hash=token_hash,
                token_expires_at_ms=token_expires_at_ms,
            ),
        )

    async def deny(
        self,
        user_code: str,
        now_ms: int,
        *,
        user_id: str,
        device_id: str | None,
        approver_address: str | None,
    ) -> Pairing | None:
        return await timed(
            "pair_deny",
            self.inner.deny(
                user_code, now_ms, user_id=user_id, device_id=device_id, approver_address=approver_address
            ),
        )

    async def poll(self, pairing_hash: bytes, now_ms: int) -> Pairing | None:
        return await timed("pair_poll", self.inner.poll(pairing_hash, now_ms))

    async def sweep(self, now_ms: int) -> int:
        return await timed("sweep_pairings", self.inner.sweep(now_ms))

    async def count(self) -> int:
        return await self.inner.count()


class TimedBackend:
    """A state backend whose stores are all timed (see the module docstring)."""

    def __init__(self, inner: StateBackend) -> None:
        self.inner = inner
        self._tokens = TimedTokenStore(inner.tokens)
        self._pairings = TimedPairingStore(inner.pairings)

    @property
    def tokens(self) -> TimedTokenStore:
        return self._tokens

    @property
    def pairings(self) -> TimedPairingStore:
        return self._pairings

    @property
    def shared(self) -> bool:
        return self.inner.shared

    def uia_sessions(self, lifetime_seconds: float) -> TimedUiaSessionStore:
        return TimedUiaSessionStore(self.inner.uia_sessions(lifetime_seconds))

    def rate_limiter(self, name: str, per_second: float, burst_count: int) -> TimedRateLimitStore:
        return TimedRateLimitStore(
            self.inner.rate_limiter(name, per_second, burst_count), LIMITER_LABELS.get(name, name)
        )

    async def close(self) -> None:
        await self.inner.close()


class HostTokens(Protocol):
    """Where the host mints and spends the login tokens itself: its two calls the module makes."""

    def create_login_token(self, user_id: str, duration_in_ms: int) -> Awaitable[str]: ...

    def invalidate_login_tokens(
        self, user_id: str, token_hashes: Collection[bytes]
    ) -> Awaitable[list[bytes]]: ...


class TimedHostTokens:
    """The host's token calls, timed as the stores' are: minting as ``mint``, revoking
    as ``revoke``. (The hashes the module notes beside them, in memory, are not timed.)"""

    def __init__(self, host: HostTokens) -> None:
        self._host = host

    async def create_login_token(self, user_id: str, duration_in_ms: int) -> str:
        return await timed("mint", self._host.create_login_token(user_id, duration_in_ms))

    async def invalidate_login_tokens(self, user_id: str, token_hashes: Collection[bytes]) -> list[bytes]:
        return await timed("revoke", self._host.invalidate_login_tokens(user_id, token_hashes))

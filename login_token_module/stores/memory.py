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
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet.task import deferLater

from login_token_module.audit import fingerprint_prefix
from login_token_module.ratelimit import Ratelimiter
from login_token_module.stores import (
    LineageEntry,
    Pairing,
    SpendOutcome,
    StartOutcome,
    TokenInfo,
    TokenSpend,
)
from login_token_module.uia import UiaSession, UiaSessions

SWEEP_SLICE = 2_000


@dataclass(slots=True)
class _Token:
    user_id: str
    expires_at_ms: int
    device_id: str | None
    issued_at_ms: int | None


@dataclass(slots=True)
class _History:
    user_id: str
    device_id: str | None
    issued_at_ms: int
    expires_at_ms: int
    outcome: str | None = None
    finished_at_ms: int | None = None
    new_device_id: str | None = None
    paired: bool = False


class MemoryTokenStore:
    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._tokens: dict[bytes, _Token] = {}
        self._issue_order: deque[bytes] = deque()
        # Live token hashes per user, so a logout revokes without a scan. A user
        # nearly always holds one token (get_token is rate limited), kept bare;
        # a set is made only for a second one (it costs more than the token itself).
        self._by_user: dict[str, bytes | set[bytes]] = {}
        # Token history (lineage), in issue order for the retention sweep.
        self._history: dict[bytes, _History] = {}
        self._history_order: deque[bytes] = deque()

    async def add_token(
        self,
        token_hash: bytes,
        user_id: str,
        expires_at_ms: int,
        *,
        device_id: str | None = None,
        issued_at_ms: int | None = None,
    ) -> None:
        self._forget(token_hash)
        self._tokens[token_hash] = _Token(user_id, expires_at_ms, device_id, issued_at_ms)
        self._issue_order.append(token_hash)
        self._add_to_user(user_id, token_hash)
        if issued_at_ms is not None:
            self._history[token_hash] = _History(user_id, device_id, issued_at_ms, expires_at_ms)
            self._history_order.append(token_hash)

    def _add_to_user(self, user_id: str, token_hash: bytes) -> None:
        mine = self._by_user.get(user_id)
        if mine is None:
            self._by_user[user_id] = token_hash
        elif isinstance(mine, bytes):
            self._by_user[user_id] = {mine, token_hash}
        else:
            mine.add(token_hash)

    def _forget(self, token_hash: bytes) -> _Token | None:
        entry = self._tokens.pop(token_hash, None)
        if entry is not None:
            mine = self._by_user.get(entry.user_id)
            if mine == token_hash:
                del self._by_user[entry.user_id]
            elif isinstance(mine, set):
                mine.discard(token_hash)
                if not mine:
                    del self._by_user[entry.user_id]
        return entry

    def _hashes_of(self, user_id: str) -> list[bytes]:
        """The hashes of the tokens ``user_id`` holds."""
        mine = self._by_user.get(user_id)
        if mine is None:
            return []
        return [mine] if isinstance(mine, bytes) else list(mine)

    async def spend_token(self, token_hash: bytes, now_ms: int) -> TokenSpend:
        # No await before the pop: atomic on the reactor thread, a second caller finds nothing.
        entry = self._forget(token_hash)
        history = self._history.get(token_hash)
        if entry is None:
            if history is None:
                return TokenSpend("unknown")
            outcome: SpendOutcome = (
                "reused"
                if history.outcome == "spent"
                else "revoked"
                if history.outcome == "revoked"
                else "expired"
            )
            return TokenSpend(outcome, history.user_id, history.device_id)
        if entry.expires_at_ms <= now_ms:
            return TokenSpend("expired", entry.user_id, entry.device_id)
        if history is not None:
            history.outcome, history.finished_at_ms = "spent", now_ms
        return TokenSpend("spent", entry.user_id, entry.device_id, entry.expires_at_ms, entry.issued_at_ms)

    async def unspend_token(self, token_hash: bytes, spend: TokenSpend) -> bool:
        if spend.outcome != "spent" or spend.user_id is None or spend.expires_at_ms is None:
            return False
        if token_hash in self._tokens:
            return False
        history = self._history.get(token_hash)
        if history is not None:
            history.outcome = history.finished_at_ms = history.new_device_id = None
        self._tokens[token_hash] = _Token(
            spend.user_id, spend.expires_at_ms, spend.minted_by_device, spend.issued_at_ms
        )
        self._issue_order.append(token_hash)
        self._add_to_user(spend.user_id, token_hash)
        return True

    async def record_new_device(self, token_hash: bytes, device_id: str) -> None:
        history = self._history.get(token_hash)
        if history is not None:
            history.new_device_id = device_id

    def mark_paired(self, token_hash: bytes) -> None:
        """Note in the token's history that a pairing's approval minted it."""
        history = self._history.get(token_hash)
        if history is not None:
            history.paired = True

    def _info(self, token_hash: bytes, entry: _Token) -> TokenInfo:
        return TokenInfo(token_hash, entry.user_id, entry.device_id, entry.issued_at_ms, entry.expires_at_ms)

    def _revoke(self, hashes: list[bytes], now_ms: int) -> list[TokenInfo]:
        revoked = []
        for token_hash in hashes:
            entry = self._tokens.get(token_hash)
            if entry is None or entry.expires_at_ms <= now_ms:
                continue
            self._forget(token_hash)
            revoked.append(self._info(token_hash, entry))
            history = self._history.get(token_hash)
            if history is not None:
                history.outcome, history.finished_at_ms = "revoked", now_ms
        return revoked

    async def revoke_tokens(
        self, user_id: str, now_ms: int, *, device_id: str | None = None
    ) -> list[TokenInfo]:
        hashes = [
            token_hash
            for token_hash in self._hashes_of(user_id)
            if device_id is None or self._tokens[token_hash].device_id == device_id
        ]
        return self._revoke(hashes, now_ms)

    async def revoke_fingerprint(self, fingerprint: str, now_ms: int) -> list[TokenInfo]:
        prefix = fingerprint_prefix(fingerprint)
        return self._revoke([h for h in self._tokens if h.startswith(prefix)], now_ms)

    async def list_tokens(self, now_ms: int, user_id: str | None = None) -> list[TokenInfo]:
        hashes = self._hashes_of(user_id) if user_id is not None else self._tokens.keys()
        found = [self._info(h, self._tokens[h]) for h in hashes if self._tokens[h].expires_at_ms > now_ms]
        return sorted(found, key=lambda info: (info.expires_at_ms, info.token_hash))

    async def lineage(self, user_id: str) -> list[LineageEntry]:
        return [
            LineageEntry(
                h,
                e.user_id,
                e.device_id,
                e.issued_at_ms,
                e.expires_at_ms,
                e.outcome,
                e.finished_at_ms,
                e.new_device_id,
                e.paired,
            )
            for h, e in self._history.items()
            if e.user_id == user_id
        ]

    async def count_outstanding(self, now_ms: int) -> int:
        # Tokens expire in issue order (see the module docstring), so the expired
        # ones are a prefix of the issue order: count them, not every token held.
        expired = 0
        for token_hash in self._issue_order:
            entry = self._tokens.get(token_hash)
            if entry is None:
                continue
            if entry.expires_at_ms > now_ms:
                break
            expired += 1
        return len(self._tokens) - expired

    async def delete_history(self, before_ms: int) -> int:
        removed = 0
        order, history = self._history_order, self._history
        while order:
            entry = history.get(order[0])
            if entry is not None and entry.issued_at_ms > before_ms:
                break
            if entry is not None:
                del history[order[0]]
                removed += 1
            order.popleft()
            if removed % SWEEP_SLICE == SWEEP_SLICE - 1:
                await deferLater(self._reactor, 0, lambda: None)
        return removed

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
                if entry.expires_at_ms > now_ms:
                    return removed, True
                self._forget(head)
                removed += 1
            order.popleft()
        return removed, False

    async def count_tokens(self) -> int:
        return len(self._tokens)

    async def close(self) -> None:
        self._tokens.clear()
        self._issue_order.clear()
        self._by_user.clear()
        self._history.clear()
        self._history_order.clear()


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


class MemoryPairingStore:
    """Pairings in this process, keyed by pairing hash, with an index by user code.

    No call awaits before it has changed what it changes, so each is atomic among
    the requests this process serves (a second poll finds the pairing gone).
    """

    def __init__(self, reactor: Any, tokens: MemoryTokenStore) -> None:
        self._reactor = reactor
        self._tokens = tokens
        self._pairings: dict[bytes, Pairing] = {}
        self._by_code: dict[str, bytes] = {}
        # The pairings each client address holds, so the pending cap counts only its own.
        self._by_address: dict[str | None, set[bytes]] = {}

    def _live(self, user_code: str, now_ms: int) -> Pairing | None:
        pairing_hash = self._by_code.get(user_code)
        pairing = None if pairing_hash is None else self._pairings.get(pairing_hash)
        if pairing is None or pairing.expires_at_ms <= now_ms:
            return None
        return pairing

    def _drop(self, pairing: Pairing) -> None:
        self._pairings.pop(pairing.pairing_hash, None)
        if self._by_code.get(pairing.user_code) == pairing.pairing_hash:
            del self._by_code[pairing.user_code]
        held = self._by_address.get(pairing.client_address)
        if held is not None:
            held.discard(pairing.pairing_hash)
            if not held:
                del self._by_address[pairing.client_address]

    async def start(self, pairing: Pairing, now_ms: int, max_pending_per_address: int) -> StartOutcome:
        taken = self._by_code.get(pairing.user_code)
        if taken is not None:
            held = self._pairings.get(taken)
            if held is not None and held.expires_at_ms > now_ms:
                return "code_taken"
            if held is not None:
                self._drop(held)
        pending = 0
        for pairing_hash in self._by_address.get(pairing.client_address, ()):
            held = self._pairings[pairing_hash]
            if held.status == "pending" and held.expires_at_ms > now_ms:
                pending += 1
        if pending >= max_pending_per_address:
            return "address_full"
        self._pairings[pairing.pairing_hash] = pairing
        self._by_code[pairing.user_code] = pairing.pairing_hash
        self._by_address.setdefault(pairing.client_address, set()).add(pairing.pairing_hash)
        return "started"

    async def find(self, user_code: str, now_ms: int) -> Pairing | None:
        pairing = self._live(user_code, now_ms)
        return pairing if pairing is not None and pairing.status == "pending" else None

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
        pairing = await self.find(user_code, now_ms)
        if pairing is None:
            return None
        approved = replace(
            pairing,
            status="approved",
            user_id=user_id,
            device_id=device_id,
            approver_address=approver_address,
            sealed_token=sealed_token,
            token_expires_at_ms=token_expires_at_ms,
            expires_at_ms=min(pairing.expires_at_ms, token_expires_at_ms),
        )
        self._pairings[pairing.pairing_hash] = approved
        self._tokens.mark_paired(token_hash)
        return approved

    async def deny(
        self,
        user_code: str,
        now_ms: int,
        *,
        user_id: str,
        device_id: str | None,
        approver_address: str | None,
    ) -> Pairing | None:
        pairing = await self.find(user_code, now_ms)
        if pairing is None:
            return None
        denied = replace(
            pairing, status="denied", user_id=user_id, device_id=device_id, approver_address=approver_address
        )
        self._pairings[pairing.pairing_hash] = denied
        return denied

    async def poll(self, pairing_hash: bytes, now_ms: int) -> Pairing | None:
        pairing = self._pairings.get(pairing_hash)
        if pairing is None or pairing.expires_at_ms <= now_ms:
            return None
        if pairing.status != "pending":
            self._drop(pairing)
        return pairing

    async def sweep(self, now_ms: int) -> int:
        removed = 0
        expired = [pairing for pairing in self._pairings.values() if pairing.expires_at_ms <= now_ms]
        for index, pairing in enumerate(expired):
            self._drop(pairing)
            removed += 1
            if index % SWEEP_SLICE == SWEEP_SLICE - 1:
                await deferLater(self._reactor, 0, lambda: None)
        return removed

    async def count(self) -> int:
        return len(self._pairings)


class MemoryBackend:
    """Tokens, UIA sessions and rate limits all in this process: one process only."""

    shared = False

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self.tokens = MemoryTokenStore(reactor)
        self.pairings = MemoryPairingStore(reactor, self.tokens)

    def uia_sessions(self, lifetime_seconds: float) -> MemoryUiaSessionStore:
        return MemoryUiaSessionStore(self._reactor, lifetime_seconds)

    def rate_limiter(self, name: str, per_second: float, burst_count: int) -> MemoryRateLimitStore:
        return MemoryRateLimitStore(self._reactor, per_second, burst_count)

    async def close(self) -> None:
        await self.tokens.close()

"""Where the module's state lives: login tokens, UIA sessions and rate-limit counters.

Each kind of state has one Protocol here and a backend per place it can live:
process memory (fastest, one process), SQLite (processes on one machine
sharing a file) and PostgreSQL (processes on many machines). The ``store``
config picks the backend for all three (see :func:`make_state`), so state that
must be global across worker processes is never split between them.

Stores see only token hashes, never tokens. The operations that must be atomic
are: ``spend_token`` (however many requests or processes present the same
token at once, at most one gets the user back), ``UiaSessionStore.spend`` (a
completed session mints at most once) and ``RateLimitStore.acquire`` (checking
the limit and counting the action are one step, so racing requests cannot all
slip under it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from login_token_module.config import ConfigError, StoreConfig
from login_token_module.uia import UiaSession

SpendOutcome = Literal["spent", "unknown", "expired", "reused", "revoked"]


@dataclass(frozen=True)
class TokenSpend:
    """What presenting a token at login came to.

    ``outcome`` is ``spent`` for the one login a token allows; otherwise why it
    was refused: ``unknown`` (never issued here, or its history is gone),
    ``expired``, ``reused`` (already spent) or ``revoked``. ``user_id`` and
    ``minted_by_device`` are known whenever the token was issued here.
    """

    outcome: SpendOutcome
    user_id: str | None = None
    minted_by_device: str | None = None
    # Of a spent token: what it takes to make it live again (``unspend_token``); not
    # part of what the spend came to, so left out of comparisons.
    expires_at_ms: int | None = field(default=None, compare=False)
    issued_at_ms: int | None = field(default=None, compare=False)

    def user_id_if_spent(self) -> str | None:
        return self.user_id if self.outcome == "spent" else None


@dataclass(frozen=True)
class TokenInfo:
    """An outstanding token, as operators see it (its hash, never the token)."""

    token_hash: bytes
    user_id: str
    minted_by_device: str | None
    issued_at_ms: int | None
    expires_at_ms: int


@dataclass(frozen=True)
class LineageEntry:
    """One token's history: who minted it on which device, and what became of it.

    ``outcome``: ``spent`` (``new_device_id`` is the device it signed in, once
    the host reported it), ``revoked``, or None while nothing has happened to
    it (outstanding until ``expires_at_ms``, expired after).
    """

    token_hash: bytes
    user_id: str
    minted_by_device: str | None
    issued_at_ms: int
    expires_at_ms: int
    outcome: str | None
    finished_at_ms: int | None
    new_device_id: str | None
    # Whether the token was minted by approving a pairing (delivered to the new
    # device by ``pair/poll``) rather than handed out by get_token.
    paired: bool = False


class TokenStore(Protocol):
    async def add_token(
        self,
        token_hash: bytes,
        user_id: str,
        expires_at_ms: int,
        *,
        device_id: str | None = None,
        issued_at_ms: int | None = None,
    ) -> None:
        """Remember a freshly minted token until ``expires_at_ms``, with the device that
        minted it; with ``issued_at_ms``, its history too (kept for lineage)."""

    async def spend_token(self, token_hash: bytes, now_ms: int) -> TokenSpend:
        """Spend the token if it is live (never twice), else say why it cannot be spent."""

    async def record_new_device(self, token_hash: bytes, device_id: str) -> None:
        """Note in the token's history the device its login created."""

    async def unspend_token(self, token_hash: bytes, spend: TokenSpend) -> bool:
        """Make a token that ``spend`` spent live again (its login failed after the
        spend: the device could not be created), until its own expiry; whether it was.
        Nothing happens to a token that was not spent by ``spend``."""

    async def revoke_tokens(
        self, user_id: str, now_ms: int, *, device_id: str | None = None
    ) -> list[TokenInfo]:
        """Revoke the user's outstanding tokens (only those minted by ``device_id`` if given)."""

    async def revoke_fingerprint(self, fingerprint: str, now_ms: int) -> list[TokenInfo]:
        """Revoke outstanding tokens whose hash starts with the hex digits ``fingerprint``."""

    async def list_tokens(self, now_ms: int, user_id: str | None = None) -> list[TokenInfo]:
        """Outstanding tokens (the user's, if given), soonest to expire first."""

    async def lineage(self, user_id: str) -> list[LineageEntry]:
        """The user's token history still kept, oldest first."""

    async def count_outstanding(self, now_ms: int) -> int:
        """How many tokens are live: issued, not spent, revoked or expired."""

    async def delete_history(self, before_ms: int) -> int:
        """Forget the history of tokens issued at or before ``before_ms``; how many went."""

    async def delete_expired(self, now_ms: int) -> int:
        """Forget tokens that expired at or before ``now_ms``; how many went."""

    async def count_tokens(self) -> int:
        """How many tokens are held, expired-but-unswept ones included."""

    async def close(self) -> None:
        """Release files and threads; the store is not used afterwards."""


class UiaSessionStore(Protocol):
    """User-Interactive Auth sessions: one user, one endpoint, a fixed lifetime, spent once."""

    async def create(self, user_id: str, endpoint: str, now: float) -> UiaSession:
        """A new session; the user's oldest ones go beyond MAX_SESSIONS_PER_USER."""

    async def get(self, session_id: str, now: float) -> UiaSession | None:
        """The live session with this id, or None (unknown, expired or spent)."""

    async def spend(self, session_id: str) -> UiaSession | None:
        """Remove and return the session; None if it was already gone. At most one caller wins."""

    async def restore(self, session: UiaSession) -> None:
        """Hold ``session`` again (its spend came to nothing: the token could not be stored)."""

    async def sweep(self, now: float) -> int:
        """Drop expired sessions without holding the reactor for long; how many went."""

    async def count(self) -> int:
        """How many sessions are held, expired-but-unswept ones included."""


class RateLimitStore(Protocol):
    """A leaky bucket per key (any string: a user id, an address), Synapse's
    ``per_second`` / ``burst_count`` meaning, shared by everyone using the same
    backend and limiter name."""

    async def acquire(self, key: str, now: float) -> int | None:
        """Count one action for ``key`` if it fits: None. Else how many ms until it
        would fit, and nothing is counted. Check and count are one atomic step."""

    async def record(self, key: str, now: float) -> None:
        """Count one action whether or not it fits (one counted after the fact: the
        host's login counted against the account it turned out to be)."""

    async def refund(self, key: str, now: float) -> None:
        """Take back one counted action (its request failed before doing anything)."""

    async def sweep(self, now: float) -> int:
        """Forget keys whose count has drained to nothing; how many went."""

    async def count(self) -> int:
        """How many keys are held."""


PairingStatus = Literal["pending", "approved", "denied"]
StartOutcome = Literal["started", "code_taken", "address_full"]


@dataclass(frozen=True)
class Pairing:
    """A new device waiting to be signed in by code (``pairing.py``).

    Keyed by the SHA-256 of its ``pairing_id`` (the new device's secret, never
    stored) and found by its ``user_code`` (8 letters, kept without the dash).
    ``seal_key`` is the public half of a key pair derived from the pairing_id:
    an approval seals the login token to it, so the stored ``sealed_token`` is
    of no use without the pairing_id the new device holds.
    """

    pairing_hash: bytes
    user_code: str
    seal_key: bytes
    display_name: str | None
    client_address: str | None
    created_at_ms: int
    expires_at_ms: int
    status: PairingStatus = "pending"
    # Once approved or denied: by whom, on which device, from which address.
    user_id: str | None = None
    device_id: str | None = None
    approver_address: str | None = None
    sealed_token: bytes | None = field(default=None, repr=False)
    token_expires_at_ms: int | None = None


class PairingStore(Protocol):
    """Pairings from start to delivery. Every change is one atomic step: of racing
    approvals, denials and polls, one wins and the others find nothing to do."""

    async def start(self, pairing: Pairing, now_ms: int, max_pending_per_address: int) -> StartOutcome:
        """Hold a new pending ``pairing`` (``started``), unless a live pairing has its
        user code (``code_taken``: draw another) or its client address already has
        ``max_pending_per_address`` pending ones (``address_full``)."""

    async def find(self, user_code: str, now_ms: int) -> Pairing | None:
        """The live, pending pairing with this user code, or None."""

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
        """Approve the live pending pairing with this code (it now expires with its
        token, if that is sooner), and mark the token's history as paired; the pairing
        as it now is, or None if none was pending (nothing changes then)."""

    async def deny(
        self,
        user_code: str,
        now_ms: int,
        *,
        user_id: str,
        device_id: str | None,
        approver_address: str | None,
    ) -> Pairing | None:
        """Deny the live pending pairing with this code; None if none was pending."""

    async def poll(self, pairing_hash: bytes, now_ms: int) -> Pairing | None:
        """The new device asks: a pending pairing comes back unchanged; an approved or
        denied one comes back and is gone (delivered once, however many ask at once);
        None for an unknown, expired or delivered one."""

    async def sweep(self, now_ms: int) -> int:
        """Forget pairings that expired at or before ``now_ms``; how many went."""

    async def count(self) -> int:
        """How many pairings are held, expired-but-unswept ones included."""


class StateBackend(Protocol):
    """Everything the module keeps, in one place chosen by the ``store`` config."""

    @property
    def tokens(self) -> TokenStore: ...

    @property
    def shared(self) -> bool:
        """Whether UIA sessions and rate limits are visible to other processes."""

    @property
    def pairings(self) -> PairingStore:
        """Pairings, where the tokens are (their approval marks a token's history)."""

    def uia_sessions(self, lifetime_seconds: float) -> UiaSessionStore: ...

    def rate_limiter(self, name: str, per_second: float, burst_count: int) -> RateLimitStore:
        """The limiter called ``name``: every process using the same name shares its counts."""

    async def close(self) -> None:
        """Release connections, files and threads."""


def resolve_sqlite_path(path: str, config_directory: str) -> str:
    if path != ":memory:" and not os.path.isabs(path):
        return os.path.join(config_directory, path)
    return path


def make_state(
    config: StoreConfig, reactor: Any, config_directory: str, *, multiple_workers: bool = False
) -> StateBackend:
    """The configured backend, ready to use; anything it cannot use is a ConfigError.

    ``multiple_workers``: several processes serve this homeserver at once, so
    state kept in one process's memory would be split between them: refused.
    """
    if config.type == "memory":
        if multiple_workers:
            raise ConfigError(
                ["store", "type"],
                "'memory' keeps tokens inside one process, but several worker processes serve this"
                " homeserver; use sqlite or postgres",
            )
        from login_token_module.stores.memory import MemoryBackend

        return MemoryBackend(reactor)

    shared = (
        config.shared_state
        if config.shared_state is not None
        else (config.type == "postgres" or multiple_workers)
    )
    if multiple_workers and not shared:
        raise ConfigError(
            ["store", "shared_state"],
            "must be true when several worker processes serve this homeserver"
            " (UIA sessions and rate limits would be split between them)",
        )

    from login_token_module.stores.sql import STATE_SCHEMA, SqlBackend

    if config.type == "postgres":
        from login_token_module.stores.engines import postgres

        problem = postgres.start_up_problem(
            config.dsn, {"application_name": "login_token_module"}, STATE_SCHEMA
        )
        if problem is not None:
            raise ConfigError(["store", "dsn"], problem)
        db: Any = postgres.PostgresDatabase(
            reactor,
            dsn=config.dsn,
            args={"application_name": "login_token_module"},
            cp_min=config.cp_min,
            cp_max=config.cp_max,
            name="login-token-store",
        )
        return SqlBackend(reactor, db, shared=shared)

    from login_token_module.stores.engines.sqlite import SqliteDatabase, unusable_database_reason

    path = resolve_sqlite_path(config.path, config_directory)
    # Checked now, at start-up, so a bad path never becomes a 500 per request.
    problem = unusable_database_reason(path, STATE_SCHEMA)
    if problem is not None:
        raise ConfigError(["store", "path"], problem)
    if multiple_workers and path == ":memory:":
        raise ConfigError(["store", "path"], "':memory:' cannot be shared between processes; use a file")
    return SqlBackend(
        reactor, SqliteDatabase(reactor, path, schema=STATE_SCHEMA, name="login-token-store"), shared=shared
    )

"""Spending: the ``m.login.token`` login that uses a token up.

:meth:`Spending.check_login_token` is the login-type checker the host calls: it
spends the token in one atomic step and answers with its user. The host then
calls the :class:`SignedIn` it gets back once the new device exists (or its
``abandon`` if the device could not be created: the token is given back).
Absent where the host spends its own tokens (``api.abilities.mints_login_tokens``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from login_token_module import audit, tokens
from login_token_module.api import JsonDict, login_client_address
from login_token_module.errors import Codes, MatrixError
from login_token_module.metrics import Metrics
from login_token_module.stores import TokenSpend, TokenStore


class Spending:
    def __init__(self, *, store: TokenStore, metrics: Metrics, now: Callable[[], float]) -> None:
        self._store = store
        self._metrics = metrics
        self._now = now

    async def check_login_token(
        self, username: str | None, login_type: str, login_dict: JsonDict
    ) -> tuple[str, Callable[[JsonDict], Awaitable[None]]]:
        """The m.login.token checker: spend the token, answer with its user.

        The callback it returns is called by the host with the login response
        once the new device exists: it records the device in the token's history
        and writes the spend's audit record.
        """
        address = login_client_address.get()
        token = login_dict.get("token")
        if not isinstance(token, str) or not tokens.is_well_formed(token):
            # No fingerprint: whatever was sent is not a token of ours, maybe a mistyped password.
            self._refused("malformed", None, None, address, None)
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid login token")
        token_hash = tokens.hash_token(token)
        fingerprint = audit.fingerprint_of_hash(token_hash)
        spend = await self._store.spend_token(token_hash, int(self._now() * 1000))
        if spend.outcome != "spent" or spend.user_id is None:
            self._refused(spend.outcome, spend.user_id, spend.minted_by_device, address, fingerprint)
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid or expired login token, or already used")
        return spend.user_id, SignedIn(self._store, self._metrics, token_hash, spend, fingerprint, address)

    def _refused(
        self,
        reason: str,
        user_id: str | None,
        minted_by: str | None,
        address: str | None,
        fingerprint: str | None,
    ) -> None:
        self._metrics.tokens_refused.labels(reason).inc()
        audit.record(
            "spend",
            reason,
            user_id=user_id,
            minted_by_device=minted_by,
            client_address=address,
            token_fingerprint=fingerprint,
        )


class SignedIn:
    """What the host calls once the login that spent a token has its new device, or,
    if the device could not be created, :meth:`abandon`: the token is given back, so a
    login that failed never costs the user the token."""

    def __init__(
        self,
        store: TokenStore,
        metrics: Metrics,
        token_hash: bytes,
        spend: TokenSpend,
        fingerprint: str,
        address: str | None,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._token_hash = token_hash
        self._spend = spend
        self._fingerprint = fingerprint
        self._address = address

    async def __call__(self, response: JsonDict) -> None:
        """Record the device in the token's history and write the spend's audit record."""
        self._metrics.tokens_spent.inc()
        new_device = response.get("device_id")
        if isinstance(new_device, str):
            await self._store.record_new_device(self._token_hash, new_device)
        audit.record(
            "spend",
            "spent",
            user_id=self._spend.user_id,
            minted_by_device=self._spend.minted_by_device,
            new_device_id=new_device,
            client_address=self._address,
            token_fingerprint=self._fingerprint,
        )

    async def abandon(self) -> None:
        """Make the token live again (unless revoked since), until its own expiry."""
        restored = await self._store.unspend_token(self._token_hash, self._spend)
        audit.record(
            "spend",
            "given_back" if restored else "lost",
            user_id=self._spend.user_id,
            minted_by_device=self._spend.minted_by_device,
            client_address=self._address,
            token_fingerprint=self._fingerprint,
        )

"""Issuing: one get_token request, from its ``auth`` dict to a minted token.

Admit, then work: the request is checked (UIA, ``uia_flow.py``), the user's
get_token allowance reserved, the password checked and the session spent, and
only then is a token minted: the module's own, or (``host``) the host's.
Whatever fails after the reservation gives it back.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from login_token_module import audit, tokens
from login_token_module.api import JsonDict, Requester
from login_token_module.config import LoginTokenConfig
from login_token_module.errors import Codes, MatrixError, rate_limited
from login_token_module.metrics import Metrics
from login_token_module.revocation import Revocation
from login_token_module.stores import RateLimitStore, TokenStore
from login_token_module.stores.timed import HostTokens
from login_token_module.uia import UiaSession
from login_token_module.uia_flow import UiaFlow

# The module's log lines keep one logger name, whichever of its files writes them.
logger = logging.getLogger("login_token_module.module")


class Issuing:
    def __init__(
        self,
        *,
        config: LoginTokenConfig,
        uia: UiaFlow,
        limiter: RateLimitStore,
        tokens: TokenStore,
        host: HostTokens | None,
        revocation: Revocation,
        metrics: Metrics,
        now: Callable[[], float],
    ) -> None:
        self._config = config
        self._uia = uia
        self._limiter = limiter
        # ``host``: where the host mints the tokens itself (None: the module does).
        # ``tokens``: the module's token store, or the hashes of the host's tokens.
        self._tokens = tokens
        self._host = host
        self._revocation = revocation
        self._metrics = metrics
        self._now = now

    async def issue_token(
        self,
        requester: Requester,
        body: JsonDict,
        endpoint: str,
        address: str | None = None,
        still_signed_in: Callable[[], Awaitable[bool]] | None = None,
    ) -> tuple[str, int]:
        """Run UIA and the rate limit for one get_token request; mint on success.

        Admit, then work: everything the request says is checked first (cheap), then
        the user's get_token allowance is reserved, and only then is the password
        checked (bcrypt) and the session spent. Whatever fails after the reservation
        gives it back, so a wrong password or an outage costs the user nothing but
        the failed attempt. ``still_signed_in``: asked after minting; if the device
        that asked has logged out meanwhile, the new token is revoked at once.
        """
        user_id = requester.user_id
        password = session_id = None
        if self._config.require_ui_auth:
            session_id, password = await self._uia.read_auth(requester, body, endpoint)
        # Each step below is atomic in the state backend (one statement in a
        # database, or no await in memory), so requests racing on one
        # completed session, on one worker or several, mint one token at most.
        now = self._now()
        retry_after = await self._limiter.acquire(user_id, now)
        if retry_after is not None:
            # Nothing is counted or spent: the session and the allowance stay as they were.
            self._metrics.ratelimited.labels("get_token").inc()
            raise rate_limited(retry_after)
        session = None
        try:
            if password is not None:
                await self._uia.check_password(requester, endpoint, session_id, password)
            if session_id is not None:
                session = await self._uia.spend(requester, endpoint, session_id, now)
            lifetime = self._config.token_lifetime_ms
            token = await self._mint(user_id, requester.device_id, now, lifetime)
        except BaseException:
            # Nothing was issued: give back what this request spent, so the
            # user can retry (the same session, if the store failed) at once.
            await self._give_back(user_id, session)
            raise
        if still_signed_in is not None:
            await self._unless_logged_out(user_id, token, still_signed_in)
        self._metrics.tokens_issued.inc()
        audit.record(
            "issue",
            "issued",
            user_id=user_id,
            minted_by_device=requester.device_id,
            client_address=address,
            token_fingerprint=audit.fingerprint(token),
        )
        return token, lifetime

    async def _unless_logged_out(
        self, user_id: str, token: str, still_signed_in: Callable[[], Awaitable[bool]]
    ) -> None:
        """Revoke ``token`` and answer 401 if the device that asked for it logged out
        while it was being minted.

        A logout removes the access token first and revokes the device's tokens after.
        A token stored before the removal is caught by that revocation; one stored after
        it finds the access token gone here. Either way it never signs a device in.
        """
        try:
            signed_in = await still_signed_in()
        except BaseException:
            await self._revocation.revoke_one(user_id, tokens.hash_token(token))
            raise
        if not signed_in:
            await self._revocation.revoke_one(user_id, tokens.hash_token(token))
            raise MatrixError(
                401,
                Codes.UNKNOWN_TOKEN,
                "This device logged out; no token was issued",
                extra={"soft_logout": False},
            )

    async def _mint(self, user_id: str, device_id: str | None, now: float, lifetime_ms: int) -> str:
        """A new token for ``user_id``: the host's, or one of ours; either way its hash is
        kept with the device that minted it (in the store, or in memory beside the host's)."""
        now_ms = int(now * 1000)
        if self._host is not None:
            token = await self._host.create_login_token(user_id, lifetime_ms)
        else:
            token = tokens.generate_token()
        await self._tokens.add_token(
            tokens.hash_token(token),
            user_id,
            now_ms + lifetime_ms,
            device_id=device_id,
            issued_at_ms=now_ms,
        )
        return token

    async def _give_back(self, user_id: str, session: UiaSession | None) -> None:
        """Undo a request's get_token allowance (and session spend); best effort.

        If the backend is down too, the action stays counted until it drains and
        the session is gone: the client is told to try again, nothing is issued.
        """
        try:
            await self._limiter.refund(user_id, self._now())
            if session is not None:
                await self._uia.restore(session)
        except Exception as error:
            logger.warning("Could not give back a failed get_token's allowance or session: %s", error)

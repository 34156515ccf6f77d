"""The get_token endpoints' User-Interactive Auth flow: the steps a request walks.

Read the ``auth`` dict, answer a 401 challenge with a fresh session, check the
password behind the failed-password limit, and spend the session once. The
sessions themselves are kept by a :class:`~login_token_module.stores.UiaSessionStore`
(``uia.py`` is the in-memory structure behind the memory store's sessions; this
file is the flow over whichever store the config picked).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from login_token_module.api import JsonDict, ModuleApi, Requester
from login_token_module.errors import Codes, MatrixError, rate_limited
from login_token_module.metrics import Metrics
from login_token_module.stores import RateLimitStore, UiaSessionStore
from login_token_module.uia import UiaSession

# The module's log lines keep one logger name, whichever of its files writes them.
logger = logging.getLogger("login_token_module.module")

PASSWORD_STAGE = "m.login.password"
SSO_STAGE = "m.login.sso"


class UiaFlow:
    def __init__(
        self,
        *,
        sessions: UiaSessionStore,
        failed_auth: RateLimitStore,
        api: ModuleApi,
        metrics: Metrics,
        now: Callable[[], float],
        lifetime_seconds: float,
    ) -> None:
        self._lifetime = lifetime_seconds
        self._sessions = sessions
        self._failed_auth = failed_auth
        self._api = api
        self._metrics = metrics
        self._now = now

    async def read_auth(
        self, requester: Requester, body: JsonDict, endpoint: str
    ) -> tuple[str | None, str | None]:
        """Check the ``auth`` dict's shape and session (cheap: no password is checked
        here); raises the 401 challenge or a 4xx unless it offers a password to check
        or names a session in which the user completed single sign-on at the host.

        Returns the session to spend (None for credentials sent without a session: a
        one-shot prompt, proven in this request, nothing to spend) and the password
        (None only with a session completed by single sign-on: nothing left to check).
        """
        now = self._now()
        auth = body.get("auth")
        if auth is None:
            raise await self.challenge(requester, endpoint, now)
        if not isinstance(auth, dict):
            raise MatrixError(400, Codes.BAD_JSON, "'auth' must be an object")

        session_id = auth.get("session")
        if session_id is not None:
            if not isinstance(session_id, str):
                raise MatrixError(400, Codes.BAD_JSON, "'auth.session' must be a string")
            session = await self._sessions.get(session_id, now)
            if session is None or session.user_id != requester.user_id or session.endpoint != endpoint:
                self._metrics.uia_failures.labels("session").inc()
                raise await self.challenge(
                    requester,
                    endpoint,
                    now,
                    error="Unknown, expired or already used session; start again",
                )

        stage = auth.get("type")
        # After the host's fallback page the client sends the session alone (or typed
        # m.login.sso): complete if the host says this user signed in there for it.
        if (
            stage in (None, SSO_STAGE)
            and session_id is not None
            and await self._api.completed_single_sign_on(session_id, requester.user_id)
        ):
            return session_id, None
        if stage is None:
            raise await self.challenge(requester, endpoint, now, session_id=session_id)
        if stage == SSO_STAGE:
            self._metrics.uia_failures.labels("sso").inc()
            raise await self.challenge(
                requester,
                endpoint,
                now,
                session_id=session_id,
                error="Single sign-on is not complete in this session",
            )
        if stage != PASSWORD_STAGE:
            raise MatrixError(
                400, Codes.UNRECOGNIZED, f"Unsupported authentication type; use {PASSWORD_STAGE}"
            )
        password = auth.get("password")
        if password is None:
            raise MatrixError(400, Codes.MISSING_PARAM, "'auth.password' is required")
        if not isinstance(password, str):
            raise MatrixError(400, Codes.BAD_JSON, "'auth.password' must be a string")
        named_user = self._named_user(auth)
        if named_user is not None and named_user != requester.user_id:
            self._metrics.uia_failures.labels("user").inc()
            raise await self.challenge(
                requester,
                endpoint,
                now,
                session_id=session_id,
                error="You can only confirm your own account",
            )
        return session_id, password

    async def check_password(
        self, requester: Requester, endpoint: str, session_id: str | None, password: str
    ) -> None:
        """Raise 401 (with the same session) unless ``password`` is the user's.

        A failed attempt is reserved before bcrypt runs, so racing wrong passwords
        cannot all be checked; it is given back when the password is right, or when
        the check itself could not run.
        """
        user_id = requester.user_id
        retry_after = await self._failed_auth.acquire(user_id, self._now())
        if retry_after is not None:
            self._metrics.ratelimited.labels("get_token_failed_auth").inc()
            raise rate_limited(retry_after)
        try:
            right = await self._api.check_user_password(user_id, password)
        except BaseException:
            await self._give_back_failed_attempt(user_id)
            raise
        if not right:
            self._metrics.uia_failures.labels("password").inc()
            raise await self.challenge(
                requester, endpoint, self._now(), session_id=session_id, error="Invalid password"
            )
        await self._give_back_failed_attempt(user_id)

    async def spend(self, requester: Requester, endpoint: str, session_id: str, now: float) -> UiaSession:
        """Spend the completed session; a racer that spent it first leaves a fresh 401."""
        session = await self._sessions.spend(session_id)
        if session is None:
            raise await self.challenge(
                requester, endpoint, now, error="This session has already been used; start again"
            )
        return session

    async def restore(self, session: UiaSession) -> None:
        """Hold a spent session again: the request that spent it issued nothing."""
        await self._sessions.restore(session)

    async def challenge(
        self,
        requester: Requester,
        endpoint: str,
        now: float,
        *,
        session_id: str | None = None,
        error: str | None = None,
        errcode: str = Codes.FORBIDDEN,
    ) -> MatrixError:
        """The 401 that asks for (more) UIA, with a fresh session unless one is given.

        A user the host can confirm by single sign-on is offered ``m.login.sso`` too; a
        fresh session is then the host's (its fallback page completes it), held by the
        module under the same id with the module's own lifetime and single use.
        """
        user_id = requester.user_id
        flows = [{"stages": [PASSWORD_STAGE]}]
        single_sign_on = await self._api.single_sign_on_available(user_id)
        if single_sign_on:
            flows.append({"stages": [SSO_STAGE]})
        if session_id is None:
            if single_sign_on:
                session_id = await self._api.begin_single_sign_on(user_id, endpoint)
                await self._sessions.restore(UiaSession(session_id, user_id, endpoint, now + self._lifetime))
            else:
                session_id = (await self._sessions.create(user_id, endpoint, now)).session_id
        extra: JsonDict = {
            "flows": flows,
            "params": {},
            "session": session_id,
            "completed": [],
        }
        self._metrics.uia_prompts.inc()
        if error is None:
            # A plain challenge carries no errcode, as in the spec's examples.
            return ChallengeError(extra)
        return ChallengeError(extra, errcode=errcode, error=error)

    async def _give_back_failed_attempt(self, user_id: str) -> None:
        try:
            await self._failed_auth.refund(user_id, self._now())
        except Exception as error:
            logger.warning("Could not give back a failed-password allowance: %s", error)

    def _named_user(self, auth: JsonDict) -> str | None:
        """The user an auth dict names through ``identifier`` or legacy ``user``, if any."""
        identifier = auth.get("identifier")
        name: Any = None
        if isinstance(identifier, dict):
            if identifier.get("type") != "m.id.user":
                raise MatrixError(400, Codes.INVALID_PARAM, "Only m.id.user identifiers are supported")
            name = identifier.get("user")
        elif identifier is not None:
            raise MatrixError(400, Codes.BAD_JSON, "'auth.identifier' must be an object")
        else:
            name = auth.get("user")
        if name is None:
            return None
        if not isinstance(name, str):
            raise MatrixError(400, Codes.BAD_JSON, "The user in 'auth.identifier' must be a string")
        if name.startswith("@"):
            localpart, _, domain = name[1:].partition(":")
            return f"@{localpart.lower()}:{domain}"
        return f"@{name.lower()}:{self._api.server_name}"


class ChallengeError(MatrixError):
    """A UIA 401: the auth flows, plus an errcode only when a stage failed."""

    def __init__(self, extra: JsonDict, *, errcode: str = "", error: str = "") -> None:
        super().__init__(401, errcode, error, extra=extra)

    def to_json(self) -> JsonDict:
        body = dict(self.extra)
        if self.errcode:
            body["errcode"] = self.errcode
            body["error"] = self.msg
        return body

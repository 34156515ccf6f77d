"""LoginTokenModule: lets a signed-in session mint a single-use login token.

Serves ``POST /_matrix/client/v1/login/get_token`` (and the two MSC3882
unstable paths), and the ``m.login.token`` login type that spends the token.
A host that mints and spends login tokens itself (Synapse) does that part, and
the module asks it for the token instead (``api.abilities``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from twisted.internet.task import deferLater
from twisted.web.server import Request

from login_token_module import tokens
from login_token_module.api import JsonDict, ModuleApi, Requester
from login_token_module.config import ConfigError, LoginTokenConfig, parse_config
from login_token_module.errors import Codes, MatrixError, rate_limited
from login_token_module.http import JsonResource, parse_json_object
from login_token_module.ratelimit import Ratelimiter
from login_token_module.stores import TokenStore, make_store
from login_token_module.synapse import as_module_api
from login_token_module.uia import UiaSessions

logger = logging.getLogger(__name__)

STABLE_PATH = "/_matrix/client/v1/login/get_token"
# MSC3882 revision 0: the first unstable path, answering `expires_in` in seconds.
UNSTABLE_R0_PATH = "/_matrix/client/unstable/org.matrix.msc3882/login/token"
UNSTABLE_R1_PATH = "/_matrix/client/unstable/org.matrix.msc3882/login/get_token"

LOGIN_TYPE = "m.login.token"
PASSWORD_STAGE = "m.login.password"


class LoginTokenModule:
    # The module's own token store; absent when the host mints and spends the
    # tokens itself (``api.abilities.mints_login_tokens``).
    store: TokenStore

    def __init__(self, config: LoginTokenConfig, api: ModuleApi) -> None:
        # Synapse hands over its own ModuleApi: it is adapted to ours here, and
        # any other host's passes through unchanged.
        api = as_module_api(api)
        self._config = config
        self.api = api
        self._reactor = api.reactor
        self._host_tokens = api.abilities.mints_login_tokens
        if self._host_tokens:
            if config.store_configured:
                raise ConfigError(
                    ["store"],
                    "this host keeps login tokens in its own database, so the module has no "
                    "token store; remove 'store' from the module's config",
                )
        else:
            self.store = make_store(config.store, self._reactor, api.config_directory)
        self._ratelimiter = Ratelimiter(config.ratelimit.per_second, config.ratelimit.burst_count)
        self._failed_auth = Ratelimiter(
            config.failed_auth_ratelimit.per_second, config.failed_auth_ratelimit.burst_count
        )
        self._uia = UiaSessions(config.ui_auth_session_lifetime_ms / 1000)

        for path, revision in ((STABLE_PATH, 1), (UNSTABLE_R1_PATH, 1), (UNSTABLE_R0_PATH, 0)):
            api.register_web_resource(path, GetTokenResource(self, path, revision))
        if not self._host_tokens:
            api.register_password_auth_provider_callbacks(
                auth_checkers={(LOGIN_TYPE, ("token",)): self.check_login_token}
            )
        if not api.abilities.advertises_get_login_token:
            api.add_login_flow_fields(LOGIN_TYPE, {"get_login_token": True})
            api.register_capability("m.get_login_token", {"enabled": True})
            api.register_capability("org.matrix.msc3882.get_login_token", {"enabled": True})
            api.register_unstable_feature("org.matrix.msc3882")
            api.register_unstable_feature("org.matrix.msc3882.r1")
        api.looping_background_call(self.sweep, config.sweep_interval_ms)
        if not self._host_tokens:
            api.register_shutdown_callback(self.store.close)

    @staticmethod
    def parse_config(config: dict[str, Any]) -> LoginTokenConfig:
        return parse_config(config)

    def _now(self) -> float:
        return float(self._reactor.seconds())

    # -- issuing -----------------------------------------------------------

    async def issue_token(self, requester: Requester, body: JsonDict, endpoint: str) -> tuple[str, int]:
        """Run UIA and the rate limit for one get_token request; mint on success."""
        session_id = None
        if self._config.require_ui_auth:
            session_id = await self._authenticate(requester, body, endpoint)
        # Everything from here to the spend is synchronous, so two requests
        # racing with one completed session cannot both get past it.
        now = self._now()
        retry_after = self._ratelimiter.retry_after_ms(requester.user_id, now)
        if retry_after is not None:
            # Nothing is spent: the session and the user's allowance stay as they were.
            raise rate_limited(retry_after)
        session = None
        if session_id is not None:
            session = self._uia.spend(session_id)
            if session is None:
                raise self._challenge(
                    requester, endpoint, now, error="This session has already been used; start again"
                )
        self._ratelimiter.record(requester.user_id, now)
        lifetime = self._config.token_lifetime_ms
        try:
            token = await self._mint(requester.user_id, now, lifetime)
        except Exception:
            # Nothing was issued: give back what this request spent, so the
            # user can retry the same session once the store recovers.
            self._ratelimiter.refund(requester.user_id, self._now())
            if session is not None:
                self._uia.restore(session)
            raise
        logger.info("Issued a login token for %s (device %s)", requester.user_id, requester.device_id)
        return token, lifetime

    async def _mint(self, user_id: str, now: float, lifetime_ms: int) -> str:
        """A new token for ``user_id``: the host's, or one of ours kept (as a hash) in the store."""
        if self._host_tokens:
            return await self.api.create_login_token(user_id, lifetime_ms)
        token = tokens.generate_token()
        await self.store.add_token(tokens.hash_token(token), user_id, int(now * 1000) + lifetime_ms)
        return token

    def _challenge(
        self,
        requester: Requester,
        endpoint: str,
        now: float,
        *,
        session_id: str | None = None,
        error: str | None = None,
        errcode: str = Codes.FORBIDDEN,
    ) -> MatrixError:
        """The 401 that asks for (more) UIA, with a fresh session unless one is given."""
        if session_id is None:
            session_id = self._uia.create(requester.user_id, endpoint, now).session_id
        extra: JsonDict = {
            "flows": [{"stages": [PASSWORD_STAGE]}],
            "params": {},
            "session": session_id,
            "completed": [],
        }
        if error is None:
            # A plain challenge carries no errcode, as in the spec's examples.
            return _ChallengeError(extra)
        return _ChallengeError(extra, errcode=errcode, error=error)

    async def _authenticate(self, requester: Requester, body: JsonDict, endpoint: str) -> str:
        """Check the ``auth`` dict; returns the completed session's id or raises 401/4xx."""
        now = self._now()
        auth = body.get("auth")
        if auth is None:
            raise self._challenge(requester, endpoint, now)
        if not isinstance(auth, dict):
            raise MatrixError(400, Codes.BAD_JSON, "'auth' must be an object")

        session_id = auth.get("session")
        if session_id is None:
            # Credentials without a session: a one-shot prompt, proven right here.
            session_id = self._uia.create(requester.user_id, endpoint, now).session_id
        elif not isinstance(session_id, str):
            raise MatrixError(400, Codes.BAD_JSON, "'auth.session' must be a string")
        else:
            session = self._uia.get(session_id, now)
            if session is None or session.user_id != requester.user_id or session.endpoint != endpoint:
                raise self._challenge(
                    requester,
                    endpoint,
                    now,
                    error="Unknown, expired or already used session; start again",
                )

        stage = auth.get("type")
        if stage is None:
            raise self._challenge(requester, endpoint, now, session_id=session_id)
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
            raise self._challenge(
                requester,
                endpoint,
                now,
                session_id=session_id,
                error="You can only confirm your own account",
            )

        retry_after = self._failed_auth.retry_after_ms(requester.user_id, now)
        if retry_after is not None:
            raise rate_limited(retry_after)
        if not await self.api.check_user_password(requester.user_id, password):
            self._failed_auth.record(requester.user_id, self._now())
            raise self._challenge(
                requester, endpoint, self._now(), session_id=session_id, error="Invalid password"
            )
        return session_id

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
        return f"@{name.lower()}:{self.api.server_name}"

    # -- spending ----------------------------------------------------------

    async def check_login_token(
        self, username: str | None, login_type: str, login_dict: JsonDict
    ) -> tuple[str, None]:
        """The m.login.token checker: spend the token, answer with its user."""
        token = login_dict.get("token")
        if not isinstance(token, str) or not tokens.is_well_formed(token):
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid login token")
        user_id = await self.store.consume_token(tokens.hash_token(token), int(self._now() * 1000))
        if user_id is None:
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid or expired login token, or already used")
        logger.info("Login token spent for %s", user_id)
        return user_id, None

    # -- housekeeping ------------------------------------------------------

    async def sweep(self) -> None:
        """Drop expired tokens, UIA sessions and drained rate-limit buckets."""
        now = self._now()
        removed = 0 if self._host_tokens else await self.store.delete_expired(int(now * 1000))
        for part in (self._uia.sweep(now), self._ratelimiter.sweep(now), self._failed_auth.sweep(now)):
            await self._cooperate(part)
        if removed:
            logger.debug("Swept %d expired login tokens", removed)

    async def _cooperate(self, slices: Iterator[None]) -> None:
        for _ in slices:
            await deferLater(self._reactor, 0, lambda: None)


class _ChallengeError(MatrixError):
    """A UIA 401: the auth flows, plus an errcode only when a stage failed."""

    def __init__(self, extra: JsonDict, *, errcode: str = "", error: str = "") -> None:
        super().__init__(401, errcode, error, extra=extra)

    def to_json(self) -> JsonDict:
        body = dict(self.extra)
        if self.errcode:
            body["errcode"] = self.errcode
            body["error"] = self.msg
        return body


class GetTokenResource(JsonResource):
    def __init__(self, module: LoginTokenModule, path: str, revision: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._module = module
        self._path = path
        self._revision = revision

    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        requester = await self._module.api.get_user_by_req(request)
        body = parse_json_object(request, allow_empty=True)
        token, lifetime_ms = await self._module.issue_token(requester, body, self._path)
        response: JsonDict = {"login_token": token, "expires_in_ms": lifetime_ms}
        if self._revision == 0:
            response["expires_in"] = lifetime_ms // 1000
        return 200, response

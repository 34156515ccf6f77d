"""LoginTokenModule: lets a signed-in session mint a single-use login token.

Serves ``POST /_matrix/client/v1/login/get_token`` (and the two MSC3882
unstable paths), and the ``m.login.token`` login type that spends the token.
A host that mints and spends login tokens itself (Synapse) does that part, and
the module asks it for the token instead (``api.abilities``).
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.web.server import Request

from login_token_module import tokens
from login_token_module.api import JsonDict, ModuleApi, Requester
from login_token_module.config import ConfigError, LoginTokenConfig, parse_config
from login_token_module.errors import Codes, MatrixError, rate_limited
from login_token_module.http import JsonResource, parse_json_object
from login_token_module.stores import StateBackend, TokenStore, make_state
from login_token_module.stores.memory import MemoryBackend
from login_token_module.synapse import as_module_api
from login_token_module.uia import UiaSession

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
        self.state: StateBackend
        if self._host_tokens:
            if config.store_configured:
                raise ConfigError(
                    ["store"],
                    "this host keeps login tokens in its own database, so the module has no "
                    "token store; remove 'store' from the module's config",
                )
            # Only UIA sessions and rate limits are the module's here, in this process.
            self.state = MemoryBackend(self._reactor)
        else:
            # Tokens, UIA sessions and rate limits all live where the store config
            # says, so that several worker processes share them when they must.
            self.state = make_state(
                config.store, self._reactor, api.config_directory, multiple_workers=api.multiple_workers
            )
            self.store = self.state.tokens
        self._ratelimiter = self.state.rate_limiter(
            "get_token", config.ratelimit.per_second, config.ratelimit.burst_count
        )
        self._failed_auth = self.state.rate_limiter(
            "get_token_failed_auth",
            config.failed_auth_ratelimit.per_second,
            config.failed_auth_ratelimit.burst_count,
        )
        self._uia = self.state.uia_sessions(config.ui_auth_session_lifetime_ms / 1000)

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
        api.register_shutdown_callback(self.state.close)

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
        user_id = requester.user_id
        # Each step below is atomic in the state backend (one statement in a
        # database, or no await in memory), so requests racing on one
        # completed session, on one worker or several, mint one token at most.
        now = self._now()
        retry_after = await self._ratelimiter.acquire(user_id, now)
        if retry_after is not None:
            # Nothing is counted or spent: the session and the allowance stay as they were.
            raise rate_limited(retry_after)
        session = None
        if session_id is not None:
            try:
                session = await self._uia.spend(session_id)
            except Exception:
                await self._give_back(user_id, None)
                raise
            if session is None:
                await self._give_back(user_id, None)
                raise await self._challenge(
                    requester, endpoint, now, error="This session has already been used; start again"
                )
        lifetime = self._config.token_lifetime_ms
        try:
            token = await self._mint(user_id, now, lifetime)
        except Exception:
            # Nothing was issued: give back what this request spent, so the
            # user can retry the same session once the store recovers.
            await self._give_back(user_id, session)
            raise
        logger.info("Issued a login token for %s (device %s)", user_id, requester.device_id)
        return token, lifetime

    async def _mint(self, user_id: str, now: float, lifetime_ms: int) -> str:
        """A new token for ``user_id``: the host's, or one of ours kept (as a hash) in the store."""
        if self._host_tokens:
            return await self.api.create_login_token(user_id, lifetime_ms)
        token = tokens.generate_token()
        await self.store.add_token(tokens.hash_token(token), user_id, int(now * 1000) + lifetime_ms)
        return token

    async def _give_back(self, user_id: str, session: UiaSession | None) -> None:
        """Undo a request's rate-limit action (and session spend); best effort.

        If the backend is down too, the action stays counted until it drains and
        the session is gone: the client is told to try again, nothing is issued.
        """
        try:
            await self._ratelimiter.refund(user_id, self._now())
            if session is not None:
                await self._uia.restore(session)
        except Exception as error:
            logger.warning("Could not give back a failed get_token's allowance or session: %s", error)

    async def _challenge(
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
            session_id = (await self._uia.create(requester.user_id, endpoint, now)).session_id
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

    async def _authenticate(self, requester: Requester, body: JsonDict, endpoint: str) -> str | None:
        """Check the ``auth`` dict; raises 401/4xx unless the password is right.

        Returns the session to spend, or None for credentials sent without a
        session (a one-shot prompt, proven in this request: nothing to spend).
        """
        now = self._now()
        auth = body.get("auth")
        if auth is None:
            raise await self._challenge(requester, endpoint, now)
        if not isinstance(auth, dict):
            raise MatrixError(400, Codes.BAD_JSON, "'auth' must be an object")

        session_id = auth.get("session")
        if session_id is not None:
            if not isinstance(session_id, str):
                raise MatrixError(400, Codes.BAD_JSON, "'auth.session' must be a string")
            session = await self._uia.get(session_id, now)
            if session is None or session.user_id != requester.user_id or session.endpoint != endpoint:
                raise await self._challenge(
                    requester,
                    endpoint,
                    now,
                    error="Unknown, expired or already used session; start again",
                )

        stage = auth.get("type")
        if stage is None:
            raise await self._challenge(requester, endpoint, now, session_id=session_id)
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
            raise await self._challenge(
                requester,
                endpoint,
                now,
                session_id=session_id,
                error="You can only confirm your own account",
            )

        user_id = requester.user_id
        retry_after = await self._failed_auth.check(user_id, now)
        if retry_after is not None:
            raise rate_limited(retry_after)
        if not await self.api.check_user_password(user_id, password):
            await self._failed_auth.record(user_id, self._now())
            raise await self._challenge(
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
        await self._uia.sweep(now)
        await self._ratelimiter.sweep(now)
        await self._failed_auth.sweep(now)
        if removed:
            logger.debug("Swept %d expired login tokens", removed)


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

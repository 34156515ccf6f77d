"""LoginTokenModule: lets a signed-in session mint a single-use login token.

Serves ``POST /_matrix/client/v1/login/get_token`` (and the two MSC3882
unstable paths), and the ``m.login.token`` login type that spends the token.
A host that mints and spends login tokens itself (Synapse) does that part, and
the module asks it for the token instead (``api.abilities``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.web.server import Request

from login_token_module import audit, tokens
from login_token_module.api import JsonDict, ModuleApi, Requester, login_client_address
from login_token_module.config import ConfigError, LoginTokenConfig, parse_config
from login_token_module.errors import Codes, MatrixError, rate_limited
from login_token_module.http import JsonResource, client_address, parse_json_object
from login_token_module.metrics import metrics, timed
from login_token_module.stores import StateBackend, TokenInfo, TokenSpend, TokenStore, make_state
from login_token_module.stores.memory import MemoryBackend, MemoryTokenStore
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
            # Only UIA sessions and rate limits are the module's here, in this process,
            # and the hashes of the tokens it asked the host for, with the devices that
            # asked (for revocation at logout): never the tokens themselves.
            self.state = MemoryBackend(self._reactor)
            self.minted: MemoryTokenStore = self.state.tokens
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
        self.metrics = metrics()
        api.register_password_auth_provider_callbacks(
            auth_checkers=None if self._host_tokens else {(LOGIN_TYPE, ("token",)): self.check_login_token},
            on_logged_out=self.on_logged_out,
        )
        if not api.abilities.advertises_get_login_token:
            api.add_login_flow_fields(LOGIN_TYPE, {"get_login_token": True})
            api.register_capability("m.get_login_token", {"enabled": True})
            api.register_capability("org.matrix.msc3882.get_login_token", {"enabled": True})
            api.register_unstable_feature("org.matrix.msc3882")
            api.register_unstable_feature("org.matrix.msc3882.r1")
        api.looping_background_call(self.sweep, config.sweep_interval_ms)
        api.register_shutdown_callback(self.state.close)

    @property
    def revokes_on_logout(self) -> bool:
        return self._config.revoke_on_logout

    @staticmethod
    def parse_config(config: dict[str, Any]) -> LoginTokenConfig:
        return parse_config(config)

    def _now(self) -> float:
        return float(self._reactor.seconds())

    # -- issuing -----------------------------------------------------------

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
            session_id, password = await self._read_auth(requester, body, endpoint)
        # Each step below is atomic in the state backend (one statement in a
        # database, or no await in memory), so requests racing on one
        # completed session, on one worker or several, mint one token at most.
        now = self._now()
        retry_after = await timed("ratelimit_acquire", self._ratelimiter.acquire(user_id, now))
        if retry_after is not None:
            # Nothing is counted or spent: the session and the allowance stay as they were.
            self.metrics.ratelimited.labels("get_token").inc()
            raise rate_limited(retry_after)
        session = None
        try:
            if password is not None:
                await self._check_password(requester, endpoint, session_id, password)
            if session_id is not None:
                session = await timed("uia_spend", self._uia.spend(session_id))
                if session is None:
                    raise await self._challenge(
                        requester, endpoint, now, error="This session has already been used; start again"
                    )
            lifetime = self._config.token_lifetime_ms
            token = await self._mint(user_id, requester.device_id, now, lifetime)
        except BaseException:
            # Nothing was issued: give back what this request spent, so the
            # user can retry (the same session, if the store failed) at once.
            await self._give_back(user_id, session)
            raise
        if still_signed_in is not None:
            await self._unless_logged_out(user_id, token, still_signed_in)
        self.metrics.tokens_issued.inc()
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
            await self._revoke_one(user_id, tokens.hash_token(token))
            raise
        if not signed_in:
            await self._revoke_one(user_id, tokens.hash_token(token))
            raise MatrixError(
                401,
                Codes.UNKNOWN_TOKEN,
                "This device logged out; no token was issued",
                extra={"soft_logout": False},
            )

    async def _revoke_one(self, user_id: str, token_hash: bytes) -> None:
        now_ms = int(self._now() * 1000)
        if self._host_tokens:
            revoked = await self.minted.revoke_fingerprint(token_hash.hex(), now_ms)
            await timed("revoke", self.api.invalidate_login_tokens(user_id, [token_hash]))
        else:
            revoked = await timed("revoke", self.store.revoke_fingerprint(token_hash.hex(), now_ms))
        self.record_revoked(revoked, "logout")

    async def _mint(self, user_id: str, device_id: str | None, now: float, lifetime_ms: int) -> str:
        """A new token for ``user_id``: the host's, or one of ours; either way its hash is
        kept with the device that minted it (in the store, or in memory beside the host's)."""
        now_ms = int(now * 1000)
        if self._host_tokens:
            token = await timed("mint", self.api.create_login_token(user_id, lifetime_ms))
            await self.minted.add_token(
                tokens.hash_token(token),
                user_id,
                now_ms + lifetime_ms,
                device_id=device_id,
                issued_at_ms=now_ms,
            )
            return token
        token = tokens.generate_token()
        await timed(
            "add_token",
            self.store.add_token(
                tokens.hash_token(token),
                user_id,
                now_ms + lifetime_ms,
                device_id=device_id,
                issued_at_ms=now_ms,
            ),
        )
        return token

    async def _give_back(self, user_id: str, session: UiaSession | None) -> None:
        """Undo a request's get_token allowance (and session spend); best effort.

        If the backend is down too, the action stays counted until it drains and
        the session is gone: the client is told to try again, nothing is issued.
        """
        try:
            await timed("ratelimit_refund", self._ratelimiter.refund(user_id, self._now()))
            if session is not None:
                await timed("uia_restore", self._uia.restore(session))
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
        self.metrics.uia_prompts.inc()
        if error is None:
            # A plain challenge carries no errcode, as in the spec's examples.
            return _ChallengeError(extra)
        return _ChallengeError(extra, errcode=errcode, error=error)

    async def _read_auth(self, requester: Requester, body: JsonDict, endpoint: str) -> tuple[str | None, str]:
        """Check the ``auth`` dict's shape and session (cheap: no password is checked
        here); raises the 401 challenge or a 4xx unless it offers a password to check.

        Returns the session to spend (None for credentials sent without a session: a
        one-shot prompt, proven in this request, nothing to spend) and the password.
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
            session = await timed("uia_get", self._uia.get(session_id, now))
            if session is None or session.user_id != requester.user_id or session.endpoint != endpoint:
                self.metrics.uia_failures.labels("session").inc()
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
            self.metrics.uia_failures.labels("user").inc()
            raise await self._challenge(
                requester,
                endpoint,
                now,
                session_id=session_id,
                error="You can only confirm your own account",
            )
        return session_id, password

    async def _check_password(
        self, requester: Requester, endpoint: str, session_id: str | None, password: str
    ) -> None:
        """Raise 401 (with the same session) unless ``password`` is the user's.

        A failed attempt is reserved before bcrypt runs, so racing wrong passwords
        cannot all be checked; it is given back when the password is right, or when
        the check itself could not run.
        """
        user_id = requester.user_id
        retry_after = await timed("failed_auth_acquire", self._failed_auth.acquire(user_id, self._now()))
        if retry_after is not None:
            self.metrics.ratelimited.labels("get_token_failed_auth").inc()
            raise rate_limited(retry_after)
        try:
            right = await self.api.check_user_password(user_id, password)
        except BaseException:
            await self._give_back_failed_attempt(user_id)
            raise
        if not right:
            self.metrics.uia_failures.labels("password").inc()
            raise await self._challenge(
                requester, endpoint, self._now(), session_id=session_id, error="Invalid password"
            )
        await self._give_back_failed_attempt(user_id)

    async def _give_back_failed_attempt(self, user_id: str) -> None:
        try:
            await timed("failed_auth_refund", self._failed_auth.refund(user_id, self._now()))
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
        return f"@{name.lower()}:{self.api.server_name}"

    # -- spending ----------------------------------------------------------

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
        spend = await timed("spend_token", self.store.spend_token(token_hash, int(self._now() * 1000)))
        if spend.outcome != "spent" or spend.user_id is None:
            self._refused(spend.outcome, spend.user_id, spend.minted_by_device, address, fingerprint)
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid or expired login token, or already used")
        return spend.user_id, _SignedIn(self, token_hash, spend, fingerprint, address)

    def _refused(
        self,
        reason: str,
        user_id: str | None,
        minted_by: str | None,
        address: str | None,
        fingerprint: str | None,
    ) -> None:
        self.metrics.tokens_refused.labels(reason).inc()
        audit.record(
            "spend",
            reason,
            user_id=user_id,
            minted_by_device=minted_by,
            client_address=address,
            token_fingerprint=fingerprint,
        )

    # -- revocation --------------------------------------------------------

    async def on_logged_out(self, user_id: str, device_id: str | None, access_token: str) -> None:
        """Synapse's on_logged_out callback: revoke the tokens this device minted and did not spend.

        A session without a device (an application service) mints tokens no
        logout can revoke by device; an operator revokes them by user.
        """
        if not self._config.revoke_on_logout or device_id is None:
            return
        now_ms = int(self._now() * 1000)
        if self._host_tokens:
            minted = await self.minted.revoke_tokens(user_id, now_ms, device_id=device_id)
            if not minted:
                return
            found = set(
                await timed(
                    "revoke",
                    self.api.invalidate_login_tokens(user_id, [info.token_hash for info in minted]),
                )
            )
            # Those the host no longer had were spent (or swept) already.
            revoked = [info for info in minted if info.token_hash in found]
        else:
            revoked = await timed("revoke", self.store.revoke_tokens(user_id, now_ms, device_id=device_id))
        self.record_revoked(revoked, "logout")

    def record_revoked(self, revoked: list[TokenInfo], reason: str) -> None:
        for info in revoked:
            self.metrics.tokens_revoked.labels(reason).inc()
            audit.record(
                "revoke",
                "revoked",
                user_id=info.user_id,
                minted_by_device=info.minted_by_device,
                token_fingerprint=audit.fingerprint_of_hash(info.token_hash),
                reason=reason,
            )

    # -- housekeeping ------------------------------------------------------

    async def sweep(self) -> None:
        """Drop expired tokens, old token history, expired UIA sessions and drained
        rate-limit buckets; count the tokens still outstanding."""
        now = self._now()
        now_ms = int(now * 1000)
        tokens_held: TokenStore = self.minted if self._host_tokens else self.store
        removed = await timed("sweep_tokens", tokens_held.delete_expired(now_ms))
        await timed("sweep_history", tokens_held.delete_history(now_ms - self._config.history_retention_ms))
        await timed("sweep_uia", self._uia.sweep(now))
        await timed("sweep_ratelimits", self._ratelimiter.sweep(now))
        await timed("sweep_ratelimits", self._failed_auth.sweep(now))
        self.metrics.outstanding_tokens.set(
            await timed("count_outstanding", tokens_held.count_outstanding(now_ms))
        )
        if removed:
            logger.debug("Swept %d expired login tokens", removed)


class _SignedIn:
    """What the host calls once the login that spent a token has its new device, or,
    if the device could not be created, :meth:`abandon`: the token is given back, so a
    login that failed never costs the user the token."""

    def __init__(
        self,
        module: LoginTokenModule,
        token_hash: bytes,
        spend: TokenSpend,
        fingerprint: str,
        address: str | None,
    ) -> None:
        self._module = module
        self._token_hash = token_hash
        self._spend = spend
        self._fingerprint = fingerprint
        self._address = address

    async def __call__(self, response: JsonDict) -> None:
        """Record the device in the token's history and write the spend's audit record."""
        self._module.metrics.tokens_spent.inc()
        new_device = response.get("device_id")
        if isinstance(new_device, str):
            await timed(
                "record_new_device", self._module.store.record_new_device(self._token_hash, new_device)
            )
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
        module = self._module
        restored = await timed("unspend_token", module.store.unspend_token(self._token_hash, self._spend))
        audit.record(
            "spend",
            "given_back" if restored else "lost",
            user_id=self._spend.user_id,
            minted_by_device=self._spend.minted_by_device,
            client_address=self._address,
            token_fingerprint=self._fingerprint,
        )


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
        api = self._module.api
        requester = await api.get_user_by_req(request)
        body = parse_json_object(request, allow_empty=True)
        device_id = requester.device_id

        async def still_signed_in() -> bool:
            assert device_id is not None
            return await api.is_device_signed_in(requester.user_id, device_id)

        token, lifetime_ms = await self._module.issue_token(
            requester,
            body,
            self._path,
            client_address(request),
            # Only where a logout revokes tokens does a logout racing the mint revoke this one.
            still_signed_in if self._module.revokes_on_logout and device_id is not None else None,
        )
        response: JsonDict = {"login_token": token, "expires_in_ms": lifetime_ms}
        if self._revision == 0:
            response["expires_in"] = lifetime_ms // 1000
        return 200, response

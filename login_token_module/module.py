"""LoginTokenModule: lets a signed-in session mint a single-use login token.

Serves ``POST /_matrix/client/v1/login/get_token`` (and the two MSC3882
unstable paths), and the ``m.login.token`` login type that spends the token.
A host that mints and spends login tokens itself (Synapse) does that part, and
the module asks it for the token instead (``api.abilities``).

This file only wires the module together: the state backend, then one object
per job, each in its own file beside this one, then what the host is asked
to call. The jobs: ``uia_flow.py`` (User-Interactive Auth), ``issuing.py``
(a get_token request), ``spending.py`` (the ``m.login.token`` login),
``revocation.py`` (logout revokes), ``sweeping.py`` (the looping clean-up), and
``resources.py`` (the module's paths), and ``pairing.py`` (sign in a device
by code, wired only when ``pairing.enabled``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from login_token_module import pairing
from login_token_module.api import AuthChecker, JsonDict, ModuleApi
from login_token_module.config import ConfigError, LoginTokenConfig, parse_config
from login_token_module.issuing import Issuing
from login_token_module.metrics import metrics
from login_token_module.pairing import APPROVE_PATH, DENY_PATH, PAGE_PATH, POLL_PATH, START_PATH, Pairings
from login_token_module.pairing_page import PairPageResource
from login_token_module.resources import (
    GET_TOKEN_PATHS,
    GetTokenResource,
    PairApproveResource,
    PairDenyResource,
    PairPollResource,
    PairStartResource,
)
from login_token_module.revocation import Revocation
from login_token_module.spending import Spending
from login_token_module.stores import StateBackend, TokenStore, make_state
from login_token_module.stores.memory import MemoryBackend
from login_token_module.stores.sql import SqlBackend
from login_token_module.stores.timed import HostTokens, TimedBackend, TimedHostTokens
from login_token_module.sweeping import Sweeping
from login_token_module.synapse import as_module_api
from login_token_module.uia_flow import UiaFlow

LOGIN_TYPE = "m.login.token"


class LoginTokenModule:
    # The module's own token store; absent when the host mints and spends the
    # tokens itself (``api.abilities.mints_login_tokens``), as is the checker
    # that spends them.
    store: TokenStore
    check_login_token: Callable[
        [str | None, str, JsonDict], Awaitable[tuple[str, Callable[[JsonDict], Awaitable[None]]]]
    ]

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
            # Only UIA sessions and rate limits are the module's here, and notes of the
            # tokens it asked the host for (their hashes, with the devices that asked,
            # for revocation at logout): never the tokens themselves. They live in the
            # database the host lends (Synapse's, shared by all its processes), else in
            # this process's memory.
            database = api.state_database
            if database is not None:
                self.state: StateBackend = TimedBackend(SqlBackend(self._reactor, database, shared=True))
                # Timed like any store: these are database calls.
                self.minted: TokenStore = self.state.tokens
            else:
                notes = MemoryBackend(self._reactor)
                self.state = TimedBackend(notes)
                # The notes are taken untimed (in memory, beside the host's calls, which
                # are timed instead: minting as ``mint``, revoking as ``revoke``).
                self.minted = notes.tokens
            host: HostTokens | None = TimedHostTokens(api)
        else:
            # Tokens, UIA sessions and rate limits all live where the store config
            # says, so that several worker processes share them when they must.
            self.state = TimedBackend(
                make_state(
                    config.store, self._reactor, api.config_directory, multiple_workers=api.multiple_workers
                )
            )
            self.store = self.state.tokens
            host = None
        self._ratelimiter = self.state.rate_limiter(
            "get_token", config.ratelimit.per_second, config.ratelimit.burst_count
        )
        self._failed_auth = self.state.rate_limiter(
            "get_token_failed_auth",
            config.failed_auth_ratelimit.per_second,
            config.failed_auth_ratelimit.burst_count,
        )
        self._uia = self.state.uia_sessions(config.ui_auth_session_lifetime_ms / 1000)

        self.metrics = metrics()

        # Each job reads the clock through the module's ``_now`` at every call, so
        # replacing it (as tests do) moves every job's clock together.
        def clock() -> float:
            return self._now()

        # Where a token is noted when minted and revoked: the store (timed), or the
        # notes beside the host's tokens (in the host's database, timed; in memory,
        # untimed); the sweep times either.
        tokens_held: TokenStore = self.minted if self._host_tokens else self.store
        revocation = Revocation(
            tokens=tokens_held,
            host=host,
            revoke_on_logout=config.revoke_on_logout,
            metrics=self.metrics,
            now=clock,
        )
        uia = UiaFlow(
            sessions=self._uia,
            failed_auth=self._failed_auth,
            api=api,
            metrics=self.metrics,
            now=clock,
            lifetime_seconds=config.ui_auth_session_lifetime_ms / 1000,
        )
        issuing = Issuing(
            config=config,
            uia=uia,
            limiter=self._ratelimiter,
            tokens=tokens_held,
            host=host,
            revocation=revocation,
            metrics=self.metrics,
            now=clock,
        )
        sweeping = Sweeping(
            tokens=self.state.tokens,
            sessions=self._uia,
            limiters=(self._ratelimiter, self._failed_auth),
            history_retention_ms=config.history_retention_ms,
            metrics=self.metrics,
            now=clock,
        )
        # The module's public surface: each job's entry points.
        self.issue_token = issuing.issue_token
        self.on_logged_out = revocation.on_logged_out
        self.record_revoked = revocation.record_revoked
        self.sweep = sweeping.sweep

        for path, revision in GET_TOKEN_PATHS:
            api.register_web_resource(
                path,
                GetTokenResource(issuing, api, path, revision, revokes_on_logout=config.revoke_on_logout),
            )
        checkers: dict[tuple[str, tuple[str, ...]], AuthChecker] | None = None
        if not self._host_tokens:
            self.check_login_token = Spending(
                store=self.store, metrics=self.metrics, now=clock
            ).check_login_token
            checkers = {(LOGIN_TYPE, ("token",)): self.check_login_token}
        api.register_password_auth_provider_callbacks(
            auth_checkers=checkers, on_logged_out=self.on_logged_out
        )
        if not api.abilities.advertises_get_login_token:
            api.add_login_flow_fields(LOGIN_TYPE, {"get_login_token": True})
            api.register_capability("m.get_login_token", {"enabled": True})
            api.register_capability("org.matrix.msc3882.get_login_token", {"enabled": True})
            api.register_unstable_feature("org.matrix.msc3882")
            api.register_unstable_feature("org.matrix.msc3882.r1")
        api.looping_background_call(self.sweep, config.sweep_interval_ms)
        if config.pairing.enabled:
            self._wire_pairing(config, api, issuing, uia, revocation, clock)
        api.register_shutdown_callback(self.state.close)

    def _wire_pairing(
        self,
        config: LoginTokenConfig,
        api: ModuleApi,
        issuing: Issuing,
        uia: UiaFlow,
        revocation: Revocation,
        clock: Callable[[], float],
    ) -> None:
        """Pairing (``pairing.py``): its limiters, its four paths and its sweep."""
        pairings = Pairings(
            config=config.pairing,
            store=self.state.pairings,
            issuing=issuing,
            uia=uia,
            require_ui_auth=config.require_ui_auth,
            server_name=api.server_name,
            revocation=revocation,
            start_limiter=self.state.rate_limiter("pair_start", *pairing.START_LIMIT),
            poll_limiter=self.state.rate_limiter("pair_poll", 1000 / config.pairing.interval_ms, 1),
            wrong_codes=self.state.rate_limiter("pair_wrong_code", *pairing.WRONG_CODE_LIMIT),
            public_baseurl=lambda: api.public_baseurl,
            metrics=self.metrics,
            now=clock,
        )
        self.pairings = pairings
        api.register_web_resource(START_PATH, PairStartResource(pairings))
        api.register_web_resource(POLL_PATH, PairPollResource(pairings))
        api.register_web_resource(
            APPROVE_PATH, PairApproveResource(pairings, api, revokes_on_logout=config.revoke_on_logout)
        )
        api.register_web_resource(DENY_PATH, PairDenyResource(pairings, api))
        api.register_web_resource(
            PAGE_PATH,
            PairPageResource(
                pairings, api.server_name, clock, secure_cookie=api.public_baseurl.startswith("https://")
            ),
        )
        api.looping_background_call(pairings.sweep, config.sweep_interval_ms)

    @property
    def revokes_on_logout(self) -> bool:
        return self._config.revoke_on_logout

    @staticmethod
    def parse_config(config: dict[str, Any]) -> LoginTokenConfig:
        return parse_config(config)

    def _now(self) -> float:
        return float(self._reactor.seconds())

"""Synapse's ModuleApi seen through this project's ModuleApi Protocol.

Imported only inside a Synapse process (see ``__init__.py``). What Synapse does
itself, the adapter declares in ``abilities`` so the module leaves it alone:

- Synapse mints login tokens (``create_login_token``) in its own database, and
  its own ``m.login.token`` login on ``POST /login`` spends them, so every
  Synapse worker and Synapse's PostgreSQL just work;
- Synapse advertises the feature (the ``get_login_token`` flow field and the
  ``m.get_login_token`` capability) when ``login_via_existing_session.enabled``
  is true, which the adapter therefore requires.

The module keeps its own UIA, rate limit and failed-password limit. The
password is checked against the hash Synapse stores (read with
``run_db_interaction``), with Synapse's own pepper and normalisation
(``passwords.py``), in Synapse's thread pool.

Synapse tracks "log contexts" across asynchronous work: request handlers run
in the request's context, and the context must be reset when a handler gives
the reactor back. The module's resources are therefore started with Synapse's
``run_in_background``, and its background calls (which await plain Twisted
Deferreds) run outside any context and are awaited the way Synapse expects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from synapse.logging.context import PreserveLoggingContext, make_deferred_yieldable, run_in_background
from synapse.module_api.errors import SynapseError
from twisted.internet import defer
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from login_token_module.admission import BoundedQueue
from login_token_module.api import AuthChecker, HostAbilities, JsonDict, OnLoggedOut, Requester
from login_token_module.config import ConfigError
from login_token_module.errors import Codes, MatrixError
from login_token_module.http import Handler, JsonResource, set_route
from login_token_module.synapse import synapse_path
from login_token_module.synapse.passwords import check_password, select_password_hash
from login_token_module.synapse.tokens import device_signed_in, invalidate_unused_tokens

logger = logging.getLogger(__name__)

SYNAPSE_ABILITIES = HostAbilities(mints_login_tokens=True, advertises_get_login_token=True)

NO_PASSWORD_ERROR = (
    "This account has no password, so it cannot confirm a login token request; "
    "sign the new device in with single sign-on instead"
)


class SynapseApi(Protocol):
    """The parts of ``synapse.module_api.ModuleApi`` the adapter uses (all public since 1.69)."""

    @property
    def server_name(self) -> str: ...

    def register_web_resource(self, path: str, resource: IResource) -> None: ...

    async def get_user_by_req(self, req: Request) -> Any: ...

    async def create_login_token(self, user_id: str, duration_in_ms: int = ...) -> str: ...

    def run_db_interaction(self, desc: str, func: Callable[..., Any], *args: Any) -> Any: ...

    async def defer_to_thread(self, f: Callable[..., Any], *args: Any) -> Any: ...

    def looping_background_call(
        self, f: Callable[..., Any], msec: float, *args: object, desc: str | None = ..., **kwargs: Any
    ) -> None: ...

    def register_password_auth_provider_callbacks(self, **kwargs: Any) -> None: ...


class SynapseSettings:
    """The Synapse settings the module depends on, read once at start-up.

    Synapse's ModuleApi has no public way to read its configuration, so these
    come from the homeserver's parsed config (``api._hs.config.auth``): the same
    values Synapse's own password check and login servlet read, so they cannot
    drift from homeserver.yaml. If a Synapse release moves them, start-up stops
    here with a clear error rather than checking passwords without the pepper.
    """

    def __init__(self, api: object) -> None:
        try:
            auth = api._hs.config.auth  # type: ignore[attr-defined]
            self.pepper: str = auth.password_pepper
            self.passwords_for_reauth: bool = bool(auth.password_enabled_for_reauth)
            self.local_passwords: bool = bool(auth.password_localdb_enabled)
            self.login_via_existing_session: bool = bool(auth.login_via_existing_enabled)
        except AttributeError as error:
            raise ConfigError(
                [], f"cannot read Synapse's password and login settings ({error}); is this Synapse 1.163?"
            ) from None
        if not isinstance(self.pepper, str):
            raise ConfigError([], "Synapse's password_config.pepper must be a string")

    def check(self) -> None:
        """Refuse to start where the module cannot work as documented."""
        if not self.login_via_existing_session:
            raise ConfigError(
                [],
                "set login_via_existing_session: {enabled: true} in homeserver.yaml: with it Synapse "
                "advertises get_token to clients (the module's paths serve the requests)",
            )
        if not (self.passwords_for_reauth and self.local_passwords):
            raise ConfigError(
                [],
                "the module confirms users with the password Synapse stores, but homeserver.yaml "
                "turns local passwords off (password_config.enabled / localdb_enabled)",
            )


# Synapse's default thread pool (10) plus a queue as the reference host's (16).
SYNAPSE_MAX_PASSWORD_CHECKS = 26


class SynapseModuleApi:
    """This project's ModuleApi, on top of Synapse's."""

    def __init__(self, api: SynapseApi, settings: SynapseSettings | None = None) -> None:
        self._api = api
        self._settings = settings if settings is not None else SynapseSettings(api)
        self._settings.check()
        from twisted.internet import reactor

        # Synapse runs on Twisted's global reactor.
        self._reactor: Any = reactor
        # bcrypt runs in Synapse's thread pool (10 threads unless configured); at most
        # this many password checks of the module's run or wait there at once, beyond
        # which get_token answers 429 at once rather than queueing behind a flood.
        self._bcrypt = BoundedQueue(SYNAPSE_MAX_PASSWORD_CHECKS)

    @property
    def server_name(self) -> str:
        return str(self._api.server_name)

    @property
    def reactor(self) -> Any:
        return self._reactor

    @property
    def config_directory(self) -> str:
        # Synapse resolves relative paths in its config against its working directory.
        return os.getcwd()

    @property
    def multiple_workers(self) -> bool:
        # The module's UIA sessions and rate limits live in the process that
        # serves its paths: the reverse proxy routes /_synapse/client/login_token/
        # to one Synapse process (the main one), so none of it is split even
        # when Synapse runs workers. Tokens are Synapse's, in its database.
        return False

    @property
    def abilities(self) -> HostAbilities:
        return SYNAPSE_ABILITIES

    @property
    def public_baseurl(self) -> str:
        # Synapse's own value (its public_baseurl, or https://server_name/), ending in "/".
        return str(self._api._hs.config.server.public_baseurl)  # type: ignore[attr-defined]

    async def create_login_token(self, user_id: str, duration_in_ms: int) -> str:
        return str(await self._api.create_login_token(user_id, duration_in_ms))

    def register_web_resource(self, path: str, resource: IResource) -> None:
        served: IResource = resource
        served_at = synapse_path(path)
        if isinstance(resource, JsonResource):
            served = SynapseJsonResource(resource, served_at)
        self._api.register_web_resource(served_at, served)

    async def get_user_by_req(self, req: Request) -> Requester:
        try:
            requester = await self._api.get_user_by_req(req)
        except SynapseError as error:
            raise _matrix_error(error) from None
        return Requester(user_id=requester.user.to_string(), device_id=requester.device_id)

    async def is_device_signed_in(self, user_id: str, device_id: str) -> bool:
        return bool(
            await self._api.run_db_interaction(
                "login_token_module_device_signed_in", device_signed_in, user_id, device_id
            )
        )

    async def invalidate_login_tokens(self, user_id: str, token_hashes: Collection[bytes]) -> list[bytes]:
        return list(
            await self._api.run_db_interaction(
                "login_token_module_invalidate",
                invalidate_unused_tokens,
                user_id,
                frozenset(token_hashes),
                int(self._reactor.seconds() * 1000),
            )
        )

    def register_password_auth_provider_callbacks(
        self,
        *,
        auth_checkers: dict[tuple[str, tuple[str, ...]], AuthChecker] | None = None,
        on_logged_out: OnLoggedOut | None = None,
    ) -> None:
        callbacks: dict[str, Any] = {}
        if auth_checkers:
            callbacks["auth_checkers"] = auth_checkers
        if on_logged_out is not None:
            callbacks["on_logged_out"] = on_logged_out
        self._api.register_password_auth_provider_callbacks(**callbacks)

    async def check_user_password(self, user_id: str, password: str) -> bool:
        stored_hash = await self._api.run_db_interaction(
            "login_token_module_password_hash", select_password_hash, user_id
        )
        if stored_hash is None:
            raise MatrixError(403, Codes.FORBIDDEN, NO_PASSWORD_ERROR)
        return bool(
            await self._bcrypt.run(
                lambda: self._api.defer_to_thread(
                    check_password, password, self._settings.pepper, stored_hash
                )
            )
        )

    def add_login_flow_fields(self, login_type: str, fields: JsonDict) -> None:
        raise NotImplementedError("Synapse advertises get_login_token itself")

    def register_capability(self, name: str, value: JsonDict) -> None:
        raise NotImplementedError("Synapse advertises m.get_login_token itself")

    def register_unstable_feature(self, name: str, enabled: bool = True) -> None:
        raise NotImplementedError("Synapse advertises its own unstable features")

    def looping_background_call(
        self, f: Callable[..., Awaitable[object] | object], msec: float, *args: object
    ) -> None:
        async def run() -> None:
            await _outside_log_context(f, *args)

        # The module's in-memory state (UIA sessions, rate-limit buckets) lives
        # in every process that serves its paths, so each one sweeps its own.
        self._api.looping_background_call(
            run, msec, desc=getattr(f, "__qualname__", "login_token_module"), run_on_all_instances=True
        )

    def register_shutdown_callback(self, f: Callable[[], Awaitable[None] | None]) -> None:
        self._reactor.addSystemEventTrigger("before", "shutdown", lambda: _start_detached(f))


def _start_detached(f: Callable[..., Awaitable[object] | object], *args: object) -> defer.Deferred[Any]:
    """Run ``f`` in the sentinel log context, where code that knows nothing of Synapse belongs."""
    with PreserveLoggingContext():
        return defer.maybeDeferred(_as_deferred, f, *args)


def _as_deferred(f: Callable[..., Awaitable[object] | object], *args: object) -> Any:
    result = f(*args)
    if isinstance(result, Awaitable):
        return defer.ensureDeferred(_await(result))
    return result


async def _await(awaitable: Awaitable[object]) -> object:
    return await awaitable


async def _outside_log_context(f: Callable[..., Awaitable[object] | object], *args: object) -> None:
    await make_deferred_yieldable(_start_detached(f, *args))


def _matrix_error(error: Any) -> MatrixError:
    """Synapse's error (e.g. 401 M_UNKNOWN_TOKEN from get_user_by_req) as the module's."""
    body = dict(error.error_dict(None))
    errcode = str(body.pop("errcode", Codes.UNKNOWN))
    message = str(body.pop("error", error.msg))
    return MatrixError(int(error.code), errcode, message, extra=body, headers=dict(error.headers or {}))


class SynapseJsonResource(Resource):
    """Serves a module JsonResource the way Synapse serves its own.

    Synapse renders in the request's log context. The handler is started with
    Synapse's ``run_in_background``, which keeps it in that context across
    awaits and resets the context when the handler is done, and runs inside
    ``request.processing()``, so Synapse's request metrics and access log time
    it like any of Synapse's own requests.
    """

    isLeaf = True

    def __init__(self, inner: JsonResource, route: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._inner = inner
        # The path registered with Synapse: the metric label of every request served here.
        self._route = route

    def render(self, request: Request) -> Any:
        set_route(request, self._route)
        handler = self._inner.route(request)
        if handler is not None:
            run_in_background(self._serve, handler, request)
        return NOT_DONE_YET

    async def _serve(self, handler: Handler, request: Any) -> None:
        with request.processing():
            await self._inner.respond(handler, request)

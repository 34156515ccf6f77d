"""Synapse's ModuleApi seen through this project's ModuleApi Protocol.

Imported only inside a Synapse process (see ``__init__.py``). What Synapse does
itself, the adapter declares in ``abilities`` so the module leaves it alone:

- Synapse mints login tokens (``create_login_token``) in its own database, and
  its own ``m.login.token`` login on ``POST /login`` spends them, so every
  Synapse worker and Synapse's PostgreSQL just work;
- Synapse advertises the feature (the ``get_login_token`` flow field and the
  ``m.get_login_token`` capability) when ``login_via_existing_session.enabled``
  is true, which the adapter therefore requires.

The module keeps its own UIA, rate limit and failed-password limit, in tables
of its own in Synapse's database (``storage.py``), so every Synapse process can
serve its paths. The password is checked against the hash Synapse stores (read
with ``run_db_interaction``), with Synapse's own pepper and normalisation
(``passwords.py``), in Synapse's thread pool; for users that hash does not
confirm, through the password auth providers registered with Synapse for
``m.login.password`` (LDAP and the like), as Synapse's own re-authentication
asks them.

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

from login_token_module import audit
from login_token_module.admission import BoundedQueue
from login_token_module.api import AuthChecker, HostAbilities, JsonDict, OnLoggedOut, Requester
from login_token_module.config import ConfigError
from login_token_module.errors import Codes, MatrixError
from login_token_module.http import Handler, JsonResource, render_unrecognized, set_route
from login_token_module.pairing import APPROVE_PATH
from login_token_module.pairing_page import PairPageResource
from login_token_module.stores.engines.connection import Database
from login_token_module.synapse import lineage, served_path
from login_token_module.synapse.passwords import check_password, select_password_hash
from login_token_module.synapse.storage import SynapseDatabase, SynapseInternals
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

    async def create_login_token(
        self,
        user_id: str,
        duration_in_ms: int = ...,
        auth_provider_id: str | None = ...,
        auth_provider_session_id: str | None = ...,
    ) -> str: ...

    def run_db_interaction(self, desc: str, func: Callable[..., Any], *args: Any) -> Any: ...

    async def defer_to_thread(self, f: Callable[..., Any], *args: Any) -> Any: ...

    def looping_background_call(
        self, f: Callable[..., Any], msec: float, *args: object, desc: str | None = ..., **kwargs: Any
    ) -> None: ...

    def register_password_auth_provider_callbacks(self, **kwargs: Any) -> None: ...

    def register_account_validity_callbacks(self, **kwargs: Any) -> None: ...


APPROVE_DESCRIPTION = "approve signing in a new device by its pairing code"

PASSWORD_LOGIN = "m.login.password"
SSO_LOGIN = "m.login.sso"


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
            # The password auth providers' callbacks, as Synapse's own re-authentication
            # asks them (``check_auth`` and the fields each login type requires).
            self.password_providers: Any = api._hs.get_password_auth_provider()  # type: ignore[attr-defined]
            for name in ("check_auth", "get_supported_login_types"):
                if not callable(getattr(self.password_providers, name)):
                    raise AttributeError(f"PasswordAuthProvider.{name}")
            # Single sign-on in UIA: Synapse's SSO handler (the user's identity providers),
            # its UIA sessions (created here, completed by Synapse's fallback page).
            hs = api._hs  # type: ignore[attr-defined]
            self.sso_handler: Any = hs.get_sso_handler()
            self.auth_handler: Any = hs.get_auth_handler()
            self.uia_store: Any = api._store  # type: ignore[attr-defined]
            for owner, name in (
                (self.sso_handler, "get_identity_providers_for_user"),
                (self.auth_handler, "set_session_data"),
                (self.uia_store, "create_ui_auth_session"),
                (self.uia_store, "get_completed_ui_auth_stages"),
            ):
                if not callable(getattr(owner, name)):
                    raise AttributeError(f"{type(owner).__name__}.{name}")
            from synapse.api.errors import StoreError
            from synapse.handlers.ui_auth import UIAuthSessionDataConstants

            self.store_error: type[Exception] = StoreError
            self.request_user_id_key = str(UIAuthSessionDataConstants.REQUEST_USER_ID)
            # Synapse's database pool, for the module's own tables.
            self.internals: SynapseInternals | None = SynapseInternals(api)
        except (AttributeError, ImportError) as error:
            raise ConfigError([], _unsupported_synapse(error)) from None
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
        if not self.passwords_for_reauth:
            raise ConfigError(
                [],
                "the module confirms users with their password (the one Synapse stores, or through "
                "a password auth provider), but homeserver.yaml turns passwords off "
                "(password_config.enabled)",
            )


def _unsupported_synapse(error: BaseException) -> str:
    try:
        import synapse

        version = str(synapse.__version__)
    except (ImportError, AttributeError):
        version = "unknown"
    return (
        f"this Synapse ({version}) lacks what login_token_module uses of its internals ({error}); "
        "the module is tested with Synapse 1.163"
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
        self._database: SynapseDatabase | None = None
        if self._settings.internals is not None:
            self._database = SynapseDatabase(api, self._settings.internals)
            # Create or migrate the module's tables as soon as Synapse runs (the
            # first state call would anyway), so a problem shows in the log at once.
            self._reactor.callWhenRunning(self._prepare_tables)
            # Lineage: told of each login, the module finds the devices its tokens signed in.
            api.register_account_validity_callbacks(on_user_login=self._on_user_login)

    def _prepare_tables(self) -> None:
        assert self._database is not None
        done = _start_detached(self._database.prepare_now)
        done.addErrback(
            lambda failure: logger.error(
                "cannot create the module's tables in Synapse's database: %s", failure.getErrorMessage()
            )
        )

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
        # The module's state is in Synapse's database (``state_database``), which every
        # Synapse process shares, so nothing is split whichever processes serve its paths.
        return False

    @property
    def state_database(self) -> Database | None:
        return self._database

    @property
    def abilities(self) -> HostAbilities:
        return SYNAPSE_ABILITIES

    @property
    def public_baseurl(self) -> str:
        # Synapse's own value (its public_baseurl, or https://server_name/), ending in "/".
        return str(self._api._hs.config.server.public_baseurl)  # type: ignore[attr-defined]

    async def create_login_token(self, user_id: str, duration_in_ms: int) -> str:
        if self._database is None:
            return str(await self._api.create_login_token(user_id, duration_in_ms))
        # Named for lineage (lineage.py): Synapse hands both to the device the token signs in.
        return str(
            await self._api.create_login_token(
                user_id,
                duration_in_ms,
                auth_provider_id=lineage.PROVIDER_ID,
                auth_provider_session_id=lineage.new_session_id(),
            )
        )

    async def _on_user_login(
        self, user_id: str, auth_provider_type: str | None, auth_provider_id: str | None
    ) -> None:
        """Synapse's account-validity callback after every login: for the module's tokens,
        record the spend and the new device in the token's history. Never raises: Synapse
        would fail a login whose device exists already."""
        if auth_provider_id != lineage.PROVIDER_ID or auth_provider_type != lineage.TOKEN_LOGIN:
            return
        assert self._database is not None
        try:
            spends = await self._database.run(lineage.record_spends, user_id)
        except Exception as error:
            logger.warning(
                "Could not record a login token's spend in its history (the user's next token "
                "login will): %s",
                type(error).__name__,
            )
            return
        for spend in spends:
            audit.record(
                "spend",
                "spent",
                user_id=spend.user_id,
                minted_by_device=spend.minted_by_device,
                new_device_id=spend.new_device_id,
                token_fingerprint=audit.fingerprint_of_hash(spend.token_hash),
            )

    def register_web_resource(self, path: str, resource: IResource) -> None:
        served: IResource = resource
        served_at = served_path(path)
        if isinstance(resource, JsonResource):
            served = SynapseJsonResource(resource, served_at, self._settings.internals)
        elif isinstance(resource, PairPageResource):
            served = SynapsePageResource(resource)
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
        """The hash Synapse stores first; where it is absent or does not match, the
        password auth providers Synapse has for ``m.login.password`` (either confirms,
        as in Synapse's own login, where providers come first and the hash second)."""
        stored_hash: str | None = None
        if self._settings.local_passwords:
            stored_hash = await self._api.run_db_interaction(
                "login_token_module_password_hash", select_password_hash, user_id
            )
        if stored_hash is not None:
            hash_matches = await self._bcrypt.run(
                lambda: self._api.defer_to_thread(
                    check_password, password, self._settings.pepper, stored_hash
                )
            )
            if hash_matches:
                return True
        login_dict = self._provider_login_dict(password)
        if login_dict is None:
            if stored_hash is None:
                raise MatrixError(403, Codes.FORBIDDEN, NO_PASSWORD_ERROR)
            return False
        # Bounded as bcrypt is: a provider may ask a directory server over the network.
        return await self._bcrypt.run(lambda: self._provider_confirms(user_id, login_dict))

    def _provider_login_dict(self, password: str) -> JsonDict | None:
        """What the providers registered for m.login.password are handed, or None if there
        are none (or they require fields beyond the password, which UIA does not carry)."""
        fields = self._settings.password_providers.get_supported_login_types().get(PASSWORD_LOGIN)
        if fields is None or any(field != "password" for field in fields):
            return None
        return {"password": password}

    async def _provider_confirms(self, user_id: str, login_dict: JsonDict) -> bool:
        # Synapse hands providers the user as the client typed it; the full user id is one
        # of the forms they must take, and the only one that cannot name someone else.
        result = await self._settings.password_providers.check_auth(user_id, PASSWORD_LOGIN, login_dict)
        if result is None:
            return False
        # A provider confirms a user, not a password: it must be this one.
        return isinstance(result, tuple) and len(result) == 2 and result[0] == user_id

    async def single_sign_on_available(self, user_id: str) -> bool:
        # The identity providers this user has signed in with that Synapse still has.
        providers = await self._settings.sso_handler.get_identity_providers_for_user(user_id)
        return bool(providers)

    async def begin_single_sign_on(self, user_id: str, endpoint: str) -> str:
        # A UIA session of Synapse's own, which its fallback page
        # (/_matrix/client/v3/auth/m.login.sso/fallback/web?session=...) completes once the
        # user signs in at the identity provider as the user it names. Synapse's own UIA
        # accepts a session only at the uri it was made for: this one is the module's
        # path in Synapse (never the spec path, where Synapse's built-in get_token is),
        # which none of Synapse's own endpoints serves.
        uri = served_path(endpoint)
        # What Synapse's confirmation page says the user is about to do.
        description = APPROVE_DESCRIPTION if uri == APPROVE_PATH else "confirm a request for a login token"
        session = await self._settings.uia_store.create_ui_auth_session({}, uri, "POST", description)
        session_id = str(session.session_id)
        await self._settings.auth_handler.set_session_data(
            session_id, self._settings.request_user_id_key, user_id
        )
        return session_id

    async def completed_single_sign_on(self, session_id: str, user_id: str) -> bool:
        try:
            stages = await self._settings.uia_store.get_completed_ui_auth_stages(session_id)
        except self._settings.store_error:
            return False  # not a session of Synapse's
        return bool(stages.get(SSO_LOGIN) == user_id)

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

    def __init__(self, inner: JsonResource, route: str, internals: SynapseInternals | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._inner = inner
        # The path registered with Synapse: the metric label of every request served here.
        self._route = route
        self._internals = internals

    def render(self, request: Request) -> Any:
        set_route(request, self._route)
        handler = self._inner.route(request)
        if handler is not None:
            run_in_background(self._serve, handler, request)
        return NOT_DONE_YET

    async def _serve(self, handler: Handler, request: Any) -> None:
        with request.processing():
            await self._inner.respond(self._guarded(handler), request)

    def _guarded(self, handler: Handler) -> Handler:
        """``handler``, with Synapse's database being unreachable (in what the request asks
        of Synapse: the requester, the password hash, minting) answered 503, not 500."""
        internals = self._internals
        if internals is None:
            return handler

        async def guarded(request: Request) -> tuple[int, JsonDict]:
            try:
                return await handler(request)
            except Exception as error:
                unavailable = internals.unavailable(error)
                if unavailable is None:
                    raise
                raise unavailable from None

        return guarded


class SynapsePageResource(Resource):
    """Serves the pairing page (HTML forms, ``pairing_page.py``) the way
    :class:`SynapseJsonResource` serves the JSON endpoints: in the request's log
    context, reset when the page is written, inside ``request.processing()``.

    Not a leaf: the page's path is the parent of the pairing endpoints
    (``pair/start`` and the rest), which Synapse attaches to it as children.
    Any other path below it is unrecognized."""

    def __init__(self, inner: PairPageResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._inner = inner

    def getChild(self, path: bytes, request: Request) -> Resource:
        return UnrecognizedResource()

    def render(self, request: Request) -> Any:
        if request.method not in PairPageResource.METHODS:
            # The page's own answer to any other method (405, at once).
            return self._inner.render(request)  # type: ignore[no-untyped-call]
        run_in_background(self._serve, request)
        return NOT_DONE_YET

    async def _serve(self, request: Any) -> None:
        with request.processing():
            await self._inner.serve(request)


class UnrecognizedResource(Resource):
    """404 ``M_UNRECOGNIZED``, for any path below the page that no endpoint serves."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: Request) -> Any:
        return render_unrecognized(request)

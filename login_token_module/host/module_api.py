"""The host's side of the module contract (login_token_module.api.ModuleApi)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.web.resource import IResource
from twisted.web.server import Request

from login_token_module.api import AuthChecker, HostAbilities, JsonDict, OnLoggedOut, Requester
from login_token_module.host import auth, database
from login_token_module.host.state import HostState, LoginType
from login_token_module.stores.engines.connection import Database

logger = logging.getLogger(__name__)


class HostModuleApi:
    def __init__(self, hs: HostState, module_name: str) -> None:
        self._hs = hs
        self._module_name = module_name

    @property
    def server_name(self) -> str:
        return self._hs.config.server_name

    @property
    def reactor(self) -> Any:
        return self._hs.reactor

    @property
    def config_directory(self) -> str:
        return self._hs.config.config_directory

    @property
    def multiple_workers(self) -> bool:
        return self._hs.workers > 1

    @property
    def public_baseurl(self) -> str:
        return self._hs.public_baseurl

    @property
    def abilities(self) -> HostAbilities:
        # This host has no login tokens of its own and advertises only what
        # modules register: the module mints, spends and advertises.
        return HostAbilities(mints_login_tokens=False, advertises_get_login_token=False)

    async def single_sign_on_available(self, user_id: str) -> bool:
        # The reference host has no single sign-on.
        return False

    async def begin_single_sign_on(self, user_id: str, endpoint: str) -> str:
        raise NotImplementedError("the reference host has no single sign-on")

    async def completed_single_sign_on(self, session_id: str, user_id: str) -> bool:
        return False

    @property
    def state_database(self) -> Database | None:
        # The module keeps its state where its own ``store`` config says.
        return None

    async def create_login_token(self, user_id: str, duration_in_ms: int) -> str:
        raise NotImplementedError("the reference host keeps no login tokens; the module's store does")

    async def invalidate_login_tokens(self, user_id: str, token_hashes: Collection[bytes]) -> list[bytes]:
        raise NotImplementedError("the reference host keeps no login tokens; the module's store does")

    def register_web_resource(self, path: str, resource: IResource) -> None:
        registry = self._hs.registry
        if path in registry.resources:
            raise ValueError(f"{self._module_name}: path {path} is already served")
        registry.resources[path] = resource

    async def get_user_by_req(self, req: Request) -> Requester:
        return await auth.get_user_by_req(self._hs.db, req)

    async def is_device_signed_in(self, user_id: str, device_id: str) -> bool:
        return await self._hs.db.run(database.device_signed_in, user_id, device_id)

    def register_password_auth_provider_callbacks(
        self,
        *,
        auth_checkers: dict[tuple[str, tuple[str, ...]], AuthChecker] | None = None,
        on_logged_out: OnLoggedOut | None = None,
    ) -> None:
        if on_logged_out is not None:
            self._hs.registry.on_logged_out.append(on_logged_out)
        for (login_type, fields), checker in (auth_checkers or {}).items():
            if login_type == "m.login.password" or login_type in self._hs.registry.login_types:
                raise ValueError(f"{self._module_name}: login type {login_type} is already handled")
            self._hs.registry.login_types[login_type] = LoginType(tuple(fields), checker)

    async def check_user_password(self, user_id: str, password: str) -> bool:
        password_hash = await self._hs.db.run(database.get_password_hash, user_id)
        return await self._hs.hasher.check(password, password_hash)

    def add_login_flow_fields(self, login_type: str, fields: JsonDict) -> None:
        self._hs.registry.login_flow_fields.setdefault(login_type, {}).update(fields)

    def register_capability(self, name: str, value: JsonDict) -> None:
        self._hs.registry.capabilities[name] = dict(value)

    def register_unstable_feature(self, name: str, enabled: bool = True) -> None:
        self._hs.registry.unstable_features[name] = enabled

    def looping_background_call(
        self, f: Callable[..., Awaitable[object] | object], msec: float, *args: object
    ) -> None:
        running = False

        def tick() -> None:
            nonlocal running
            if running:  # the last run is still going: skip rather than pile up
                return
            running = True

            def done(result: object) -> None:
                nonlocal running
                running = False

            def failed(failure: Any) -> None:
                logger.error("Background task %s failed: %s", getattr(f, "__qualname__", f), failure.value)

            d = defer.maybeDeferred(_call_maybe_async, f, *args)
            d.addErrback(failed)
            d.addBoth(done)

        loop = LoopingCall(tick)
        loop.clock = self._hs.reactor
        self._hs.registry.loops.append((loop, msec))

    def register_shutdown_callback(self, f: Callable[[], Awaitable[None] | None]) -> None:
        self._hs.registry.shutdown_callbacks.append(f)


def _call_maybe_async(f: Callable[..., Awaitable[object] | object], *args: object) -> Any:
    result = f(*args)
    if inspect.isawaitable(result):
        return defer.ensureDeferred(awaited(result))
    return result


async def awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable

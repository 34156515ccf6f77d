"""The running homeserver as its request handlers and its module API see it.

``server.py`` builds the :class:`~login_token_module.host.server.Homeserver`;
``resources.py`` (the host's own endpoints) and ``module_api.py`` (what modules
call) use it through :class:`HostState` and the :class:`ModuleRegistry` defined
here, so they import nothing from ``server.py``: the imports run one way,
server -> module_api and resources -> state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.task import LoopingCall
from twisted.web.resource import IResource

from login_token_module.api import AuthChecker, JsonDict, OnLoggedOut
from login_token_module.host.config import HomeserverConfig
from login_token_module.host.passwords import PasswordHasher
from login_token_module.stores import RateLimitStore
from login_token_module.stores.engines.connection import Database


@dataclass
class LoginType:
    required_fields: tuple[str, ...]
    checker: AuthChecker


@dataclass
class ModuleRegistry:
    """Everything modules have added to the host, consulted by its resources."""

    resources: dict[str, IResource] = field(default_factory=dict)
    login_types: dict[str, LoginType] = field(default_factory=dict)
    login_flow_fields: dict[str, JsonDict] = field(default_factory=dict)
    capabilities: dict[str, JsonDict] = field(default_factory=dict)
    unstable_features: dict[str, bool] = field(default_factory=dict)
    on_logged_out: list[OnLoggedOut] = field(default_factory=list)
    loops: list[tuple[LoopingCall, float]] = field(default_factory=list)
    shutdown_callbacks: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)


class HostState(Protocol):
    """What of the running homeserver its endpoints and its module API use."""

    config: HomeserverConfig
    reactor: Any
    # How many processes serve this config at once (``serve --workers N``).
    workers: int
    # Users, devices and access tokens (and rc_login buckets when shared).
    db: Database
    hasher: PasswordHasher
    registry: ModuleRegistry
    # rc_login's three limiters: "address", "account", "failed_attempts".
    rc_login: dict[str, RateLimitStore]

    @property
    def public_baseurl(self) -> str:
        """The configured ``public_baseurl``, else the first client listener's address."""

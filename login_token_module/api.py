"""The contract between this module and the homeserver that hosts it.

The module depends on nothing of a host but this Protocol. Method names follow
Synapse's ``ModuleApi`` where Synapse has the method; what Synapse lacks
(checking a password for UIA, advertising capabilities, unstable features and
login-flow fields, shutdown hooks) is added in the same style.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.web.resource import IResource
from twisted.web.server import Request

if TYPE_CHECKING:
    # For the annotation only: the contract names the engines' Database Protocol.
    from login_token_module.stores.engines.connection import Database

JsonDict = dict[str, Any]

# Synapse's CHECK_AUTH_CALLBACK: (username or None, login type, login dict) ->
# (canonical user id, optional post-login callback), or None for "not me".
# A checker may also raise MatrixError to answer with a specific error.
AuthChecker = Callable[
    [str | None, str, JsonDict],
    Awaitable[tuple[str, Callable[..., Awaitable[None]] | None] | None],
]

# Synapse's ON_LOGGED_OUT_CALLBACK: (user id, device id or None, access token).
# Called after a device's access token is deleted (/logout, or each one of /logout/all).
OnLoggedOut = Callable[[str, str | None, str], Awaitable[None]]

# The client address of the login a host is processing, set by the host around its
# auth checkers (Synapse's checker signature has no request), so a module can put
# it in its audit records. None where the host does not say.
login_client_address: ContextVar[str | None] = ContextVar("login_client_address", default=None)


@dataclass(frozen=True)
class HostAbilities:
    """What the host does itself, so that the module leaves it to the host.

    Hosts differ here, and say so through this object rather than the module
    asking which host it is in.
    """

    # The host mints login tokens (``create_login_token``) and its own
    # m.login.token login spends them: the module keeps no token store and
    # registers no login type. Otherwise the module does both itself.
    mints_login_tokens: bool = False
    # The host advertises get_token itself (the ``get_login_token`` flow
    # field, capabilities, unstable features): the module adds none of them.
    advertises_get_login_token: bool = False


@dataclass(frozen=True)
class Requester:
    """Who made an authenticated request."""

    user_id: str
    device_id: str | None


class ModuleApi(Protocol):
    @property
    def server_name(self) -> str:
        """The homeserver's name, the part after ':' in user ids."""

    @property
    def reactor(self) -> Any:
        """The Twisted reactor the host runs on (time, timers, threads)."""

    @property
    def config_directory(self) -> str:
        """The folder of the host's config file; relative paths resolve here."""

    @property
    def multiple_workers(self) -> bool:
        """Whether several processes serve this homeserver at once (workers).

        State a module keeps must then be shared between them (a database), or
        each process would hold its own part; the module refuses to start otherwise.
        """

    @property
    def abilities(self) -> HostAbilities:
        """What this host does itself (see :class:`HostAbilities`)."""

    @property
    def public_baseurl(self) -> str:
        """Where clients reach this homeserver, ending in ``/`` (Synapse's key): the
        base of links the module hands out, such as a pairing's verification URL."""

    @property
    def state_database(self) -> Database | None:
        """A database of the host's, shared by all its processes, where the module may
        keep tables of its own (its UIA sessions, rate limits and notes of the tokens it
        asked for), or None. Used only when ``abilities.mints_login_tokens`` is true: a
        host that keeps the tokens lends the module its database for the rest (Synapse).
        """

    async def create_login_token(self, user_id: str, duration_in_ms: int) -> str:
        """A host login token for ``user_id``, valid for ``duration_in_ms`` (Synapse's name).

        Called only when ``abilities.mints_login_tokens`` is true.
        """

    def register_web_resource(self, path: str, resource: IResource) -> None:
        """Serve ``resource`` at ``path`` (an exact path from the server root)."""

    async def get_user_by_req(self, req: Request) -> Requester:
        """The access token's owner; raises MatrixError 401 (M_MISSING_TOKEN / M_UNKNOWN_TOKEN)."""

    async def is_device_signed_in(self, user_id: str, device_id: str) -> bool:
        """Whether the device still holds an access token: false once it has logged out.
        Read from the database that logout writes, never from a cache."""

    async def invalidate_login_tokens(self, user_id: str, token_hashes: Collection[bytes]) -> list[bytes]:
        """Make the user's unused host login tokens whose SHA-256 is among ``token_hashes``
        unusable; returns the hashes of those it found. Called only when
        ``abilities.mints_login_tokens`` is true (the module never holds the tokens)."""

    def register_password_auth_provider_callbacks(
        self,
        *,
        auth_checkers: dict[tuple[str, tuple[str, ...]], AuthChecker] | None = None,
        on_logged_out: OnLoggedOut | None = None,
    ) -> None:
        """Add login types to POST /login: (type, required fields) -> checker (only when
        ``abilities.mints_login_tokens`` is false); and ``on_logged_out``, called when a
        device logs out. A checker may return a callback with its user; the host calls it
        with the login response (``user_id``, ``device_id``, ...) once the device exists.
        """

    async def check_user_password(self, user_id: str, password: str) -> bool:
        """Whether ``password`` is the user's; the host keeps slow hashing off the reactor.

        Raises MatrixError when the user cannot confirm with a password at all
        (an account with no password, signed in through single sign-on).
        """

    async def single_sign_on_available(self, user_id: str) -> bool:
        """Whether the host can confirm this user by single sign-on (``m.login.sso``
        through the host's own UIA fallback page): the user has an identity at one of
        the host's identity providers."""

    async def begin_single_sign_on(self, user_id: str, endpoint: str) -> str:
        """Open a UIA session of the host's in which ``user_id`` can complete
        ``m.login.sso`` at the host's fallback page; its id, which the module's session
        for ``endpoint`` then takes. Called only when ``single_sign_on_available``."""

    async def completed_single_sign_on(self, session_id: str, user_id: str) -> bool:
        """Whether the host's session ``session_id`` has completed ``m.login.sso`` as
        ``user_id`` (false for a session the host does not know)."""

    def add_login_flow_fields(self, login_type: str, fields: JsonDict) -> None:
        """Extra fields on ``login_type``'s entry in GET /login flows.

        This and the next two are called only when
        ``abilities.advertises_get_login_token`` is false.
        """

    def register_capability(self, name: str, value: JsonDict) -> None:
        """An entry in GET /capabilities."""

    def register_unstable_feature(self, name: str, enabled: bool = True) -> None:
        """An entry in GET /versions ``unstable_features``."""

    def looping_background_call(
        self, f: Callable[..., Awaitable[object] | object], msec: float, *args: object
    ) -> None:
        """Call ``f(*args)`` every ``msec`` ms while the host runs; failures are logged."""

    def register_shutdown_callback(self, f: Callable[[], Awaitable[None] | None]) -> None:
        """Call ``f`` when the host stops (close files, stop threads)."""

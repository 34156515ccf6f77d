"""The host's own Client-Server endpoints."""

from __future__ import annotations

import logging
import re
import secrets
import string
import unicodedata
from typing import Any

from twisted.web.server import Request

from login_token_module.api import JsonDict, login_client_address
from login_token_module.errors import Codes, MatrixError, rate_limited
from login_token_module.host import auth, database
from login_token_module.host.state import HostState
from login_token_module.http import JsonResource, client_address, parse_json_object
from login_token_module.metrics import metrics

SUPPORTED_VERSIONS = ["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7"]
PASSWORD_LOGIN = "m.login.password"
MAX_DEVICE_ID_LENGTH = 255
MAX_DISPLAY_NAME_LENGTH = 256
LOCALPART_RE = re.compile(r"^[a-z0-9._=\-/+]+$")

logger = logging.getLogger(__name__)


def new_device_id() -> str:
    """Ten random capital letters, from one draw of randomness rather than ten."""
    number = secrets.randbelow(26**10)
    letters = []
    for _ in range(10):
        number, index = divmod(number, 26)
        letters.append(string.ascii_uppercase[index])
    return "".join(letters)


def user_id_from_name(name: str, server_name: str) -> str:
    """``alice`` or ``@alice:server`` as a full user id on this server, else 403."""
    if name.startswith("@"):
        localpart, sep, domain = name[1:].partition(":")
        if not sep or domain != server_name:
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid username or password")
    else:
        localpart = name
    localpart = localpart.lower()
    if not LOCALPART_RE.match(localpart):
        raise MatrixError(403, Codes.FORBIDDEN, "Invalid username or password")
    return f"@{localpart}:{server_name}"


def identified_user(body: JsonDict, server_name: str) -> str | None:
    """The user a login body names (``identifier`` m.id.user, or legacy ``user``)."""
    identifier = body.get("identifier")
    if identifier is not None:
        if not isinstance(identifier, dict):
            raise MatrixError(400, Codes.BAD_JSON, "'identifier' must be an object")
        if identifier.get("type") != "m.id.user":
            raise MatrixError(400, Codes.INVALID_PARAM, "Only m.id.user identifiers are supported")
        name = identifier.get("user")
    else:
        name = body.get("user")
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise MatrixError(400, Codes.BAD_JSON, "The user in 'identifier' must be a non-empty string")
    return user_id_from_name(name, server_name)


def _optional_string(body: JsonDict, key: str, max_length: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise MatrixError(
            400, Codes.INVALID_PARAM, f"'{key}' must be a non-empty string of at most {max_length} characters"
        )
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise MatrixError(400, Codes.INVALID_PARAM, f"'{key}' must not hold control characters")
    return value


async def _abandon(signed_in: Any) -> None:
    """The new device could not be created after a module accepted the login: let the
    module undo what it spent (a login token is given back), if it can."""
    abandon = getattr(signed_in, "abandon", None)
    if abandon is None:
        return
    try:
        await abandon()
    except Exception:
        logger.exception("A module could not undo a login whose device was not created")


class HostResource(JsonResource):
    def __init__(self, hs: HostState) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.hs = hs


class LoginResource(HostResource):
    async def on_GET(self, request: Request) -> tuple[int, JsonDict]:
        flows: list[JsonDict] = [{"type": PASSWORD_LOGIN}]
        registry = self.hs.registry
        for login_type in registry.login_types:
            flows.append({"type": login_type, **registry.login_flow_fields.get(login_type, {})})
        return 200, {"flows": flows}

    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        body = parse_json_object(request)
        login_type = body.get("type")
        if login_type is None:
            raise MatrixError(400, Codes.MISSING_PARAM, "'type' is required")
        if not isinstance(login_type, str):
            raise MatrixError(400, Codes.BAD_JSON, "'type' must be a string")
        # Everything about the new device is checked before any credential is
        # looked at, so a bad request never spends a single-use login token.
        device_id = _optional_string(body, "device_id", MAX_DEVICE_ID_LENGTH)
        display_name = _optional_string(body, "initial_device_display_name", MAX_DISPLAY_NAME_LENGTH)
        server_name = self.hs.config.server_name
        if login_type != PASSWORD_LOGIN and login_type not in self.hs.registry.login_types:
            # The type is not echoed: it is the client's text.
            raise MatrixError(400, Codes.UNKNOWN, "Unknown login type")

        # rc_login, as Synapse applies it: every attempt counts against the client's
        # address, before any credential is looked at. The account a request names
        # is admitted before its credentials are checked too (the allowance is given
        # back if the login fails), so racing requests cannot all slip under it.
        address = client_address(request) or "unknown"
        await self._throttle("address", address)
        if login_type == PASSWORD_LOGIN:
            named = identified_user(body, server_name)
            if named is None:
                raise MatrixError(400, Codes.MISSING_PARAM, "'identifier' is required for password login")
            password = body.get("password")
            if password is None:
                raise MatrixError(400, Codes.MISSING_PARAM, "'password' is required")
            if not isinstance(password, str):
                raise MatrixError(400, Codes.BAD_JSON, "'password' must be a string")
        else:
            try:
                named = identified_user(body, server_name)
            except MatrixError:
                # The identifier is advisory for module login types (the token
                # alone names the user); a malformed one must not fail the login.
                named = None
        if named is not None:
            await self._throttle("account", named)
        try:
            return await self._log_in(login_type, named, body, address, device_id, display_name)
        except BaseException:
            if named is not None:
                await self._give_back("account", named)
            raise

    async def _log_in(
        self,
        login_type: str,
        named: str | None,
        body: JsonDict,
        address: str,
        device_id: str | None,
        display_name: str | None,
    ) -> tuple[int, JsonDict]:
        signed_in = None
        if login_type == PASSWORD_LOGIN:
            assert named is not None
            user_id = await self._check_password(named, body["password"])
        else:
            user_id, signed_in = await self._check_module_login(login_type, named, body, address)
            if named is None:
                # Only now is the account known: count the login against it.
                await self.hs.rc_login["account"].record(user_id, self._now())

        server_name = self.hs.config.server_name
        device_id = device_id or new_device_id()
        access_token = auth.new_access_token()
        try:
            created = await self.hs.db.run(
                database.log_in_device, user_id, device_id, display_name, auth.hash_access_token(access_token)
            )
        except BaseException:
            await _abandon(signed_in)
            raise
        if not created:
            await _abandon(signed_in)
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid username or password")
        response = {
            "user_id": user_id,
            "access_token": access_token,
            "device_id": device_id,
            "home_server": server_name,
        }
        if signed_in is not None:
            try:
                await signed_in(dict(response))
            except Exception:
                # The device exists and the client gets it; only the module's bookkeeping failed.
                logger.exception("A module's post-login callback failed")
        return 200, response

    def _now(self) -> float:
        return float(self.hs.reactor.seconds())

    async def _throttle(self, limiter: str, key: str) -> None:
        """Count one attempt against ``key`` in the rc_login ``limiter``, or 429 if it is over."""
        retry_after = await self.hs.rc_login[limiter].acquire(key, self._now())
        if retry_after is not None:
            metrics().ratelimited.labels(f"rc_login_{limiter}").inc()
            raise rate_limited(retry_after)

    async def _give_back(self, limiter: str, key: str) -> None:
        """Take back an attempt that did not count after all; best effort."""
        try:
            await self.hs.rc_login[limiter].refund(key, self._now())
        except Exception as error:
            logger.warning("Could not give back an rc_login %s allowance: %s", limiter, error)

    async def _check_password(self, user_id: str, password: str) -> str:
        # A failed attempt is reserved before bcrypt runs (so racing wrong passwords
        # cannot all be checked) and given back when the password is right, or when
        # the check itself could not run.
        await self._throttle("failed_attempts", user_id)
        try:
            password_hash = await self.hs.db.run(database.get_password_hash, user_id)
            right = await self.hs.hasher.check(password, password_hash)
        except BaseException:
            await self._give_back("failed_attempts", user_id)
            raise
        if not right:
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid username or password")
        await self._give_back("failed_attempts", user_id)
        return user_id

    async def _check_module_login(
        self, login_type: str, username: str | None, body: JsonDict, address: str
    ) -> tuple[str, Any]:
        handler = self.hs.registry.login_types[login_type]
        for name in handler.required_fields:
            if name not in body:
                raise MatrixError(400, Codes.MISSING_PARAM, f"'{name}' is required for {login_type}")
        reset = login_client_address.set(address)
        try:
            result = await handler.checker(username, login_type, body)
        finally:
            login_client_address.reset(reset)
        if result is None:
            raise MatrixError(403, Codes.FORBIDDEN, "Invalid login")
        user_id = result[0]
        if not user_id.startswith("@"):
            user_id = user_id_from_name(user_id, self.hs.config.server_name)
        return user_id, result[1]


class VersionsResource(HostResource):
    async def on_GET(self, request: Request) -> tuple[int, JsonDict]:
        return 200, {
            "versions": SUPPORTED_VERSIONS,
            "unstable_features": dict(self.hs.registry.unstable_features),
        }


class CapabilitiesResource(HostResource):
    async def on_GET(self, request: Request) -> tuple[int, JsonDict]:
        await auth.get_user_by_req(self.hs.db, request)
        capabilities: dict[str, Any] = {
            "m.change_password": {"enabled": False},
            "m.set_displayname": {"enabled": False},
            "m.set_avatar_url": {"enabled": False},
            "m.3pid_changes": {"enabled": False},
        }
        capabilities.update(self.hs.registry.capabilities)
        return 200, {"capabilities": capabilities}


class WhoamiResource(HostResource):
    async def on_GET(self, request: Request) -> tuple[int, JsonDict]:
        requester = await auth.get_user_by_req(self.hs.db, request)
        return 200, {"user_id": requester.user_id, "device_id": requester.device_id, "is_guest": False}


async def logged_out(hs: HostState, user_id: str, devices: list[tuple[str, str]]) -> None:
    """Tell modules (their on_logged_out callbacks) which devices just logged out.

    The device is gone whatever a callback does; a failing one is logged.
    """
    for device_id, access_token in devices:
        for callback in hs.registry.on_logged_out:
            try:
                await callback(user_id, device_id, access_token)
            except Exception:
                logger.exception("A module's on_logged_out callback failed")


class LogoutResource(HostResource):
    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        requester = await auth.get_user_by_req(self.hs.db, request)
        assert requester.device_id is not None
        await self.hs.db.run(database.log_out_device, requester.user_id, requester.device_id)
        token = auth.access_token_from_request(request) or ""
        await logged_out(self.hs, requester.user_id, [(requester.device_id, token)])
        return 200, {}


class LogoutAllResource(HostResource):
    async def on_POST(self, request: Request) -> tuple[int, JsonDict]:
        requester = await auth.get_user_by_req(self.hs.db, request)
        devices = await self.hs.db.run(database.log_out_all, requester.user_id)
        # Only hashes of the other devices' access tokens are kept: they get "".
        token = auth.access_token_from_request(request) or ""
        await logged_out(
            self.hs,
            requester.user_id,
            [(device, token if device == requester.device_id else "") for device in devices],
        )
        return 200, {}


def host_resources(hs: HostState) -> dict[str, JsonResource]:
    """The host's endpoints by path, under every client API version prefix clients use."""
    login, whoami = LoginResource(hs), WhoamiResource(hs)
    capabilities = CapabilitiesResource(hs)
    logout, logout_all = LogoutResource(hs), LogoutAllResource(hs)
    paths: dict[str, JsonResource] = {"/_matrix/client/versions": VersionsResource(hs)}
    for prefix in ("/_matrix/client/v3", "/_matrix/client/r0"):
        paths[f"{prefix}/login"] = login
        paths[f"{prefix}/capabilities"] = capabilities
        paths[f"{prefix}/account/whoami"] = whoami
        paths[f"{prefix}/logout"] = logout
        paths[f"{prefix}/logout/all"] = logout_all
    return paths

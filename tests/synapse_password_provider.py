"""A password auth provider for Synapse, as directory modules (LDAP and the like) are.

It knows its own users and their passwords (from its config), confirms them for
``m.login.password`` through ``auth_checkers``, and registers a user in Synapse
on their first login, so such a user has no password hash in Synapse. The
Synapse tests copy this file beside the homeserver config (Synapse's working
directory is on its import path) and load it as ``synapse_password_provider.PasswordProvider``.
"""

from __future__ import annotations

import hmac
from typing import Any


class PasswordProvider:
    def __init__(self, config: dict[str, str], api: Any) -> None:
        self._api = api
        self._passwords = config
        api.register_password_auth_provider_callbacks(
            auth_checkers={("m.login.password", ("password",)): self.check_password}
        )

    @staticmethod
    def parse_config(config: dict[str, Any]) -> dict[str, str]:
        users = config.get("users")
        if not isinstance(users, dict):
            raise ValueError("users: a map of localpart to password")
        return {str(localpart): str(password) for localpart, password in users.items()}

    async def check_password(
        self, username: str, login_type: str, login_dict: dict[str, Any]
    ) -> tuple[str, None] | None:
        # The user as the client typed it: a localpart or a full user id.
        localpart = username[1:].split(":", 1)[0] if username.startswith("@") else username
        expected = self._passwords.get(localpart)
        password = login_dict.get("password")
        if expected is None or not isinstance(password, str):
            return None
        if not hmac.compare_digest(expected.encode(), password.encode()):
            return None
        user_id = self._api.get_qualified_user_id(localpart)
        if not await self._api.check_user_exists(user_id):
            user_id = await self._api.register_user(localpart)
        return user_id, None

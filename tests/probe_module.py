"""A second module for the reference host, loaded by tests next to ours.

It uses the host's module contract the way a third-party module would: one
login type of its own (with a required field and no extra flow fields) and an
``on_logged_out`` callback. It records what the host hands it, so a test can
check over HTTP that the host keeps that contract.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from login_token_module.api import JsonDict, ModuleApi

PROBE_LOGIN = "org.example.probe"
PROBE_MODULE = "tests.probe_module.ProbeModule"

CheckerAnswer = tuple[str, Callable[..., Awaitable[None]] | None] | None


class ProbeModule:
    def __init__(self, config: dict[str, Any], api: ModuleApi) -> None:
        # What the checker answers; a test sets it before it logs in.
        self.answer: CheckerAnswer = None
        self.checked: list[tuple[str | None, str, JsonDict]] = []
        self.logged_out: list[tuple[str, str | None, str]] = []
        api.register_password_auth_provider_callbacks(
            auth_checkers={(PROBE_LOGIN, ("secret",)): self.check},
            on_logged_out=self.on_logged_out,
        )

    async def check(self, username: str | None, login_type: str, body: JsonDict) -> CheckerAnswer:
        self.checked.append((username, login_type, body))
        return self.answer

    async def on_logged_out(self, user_id: str, device_id: str | None, access_token: str) -> None:
        self.logged_out.append((user_id, device_id, access_token))

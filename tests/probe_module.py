"""A second module for the reference host, loaded by tests next to ours.

It uses the host's module contract the way a third-party module would: one
login type of its own (with a required field and no extra flow fields) and an
``on_logged_out`` callback. It records what the host hands it, so a test can
check over HTTP that the host keeps that contract.

``FaultyModule`` serves handlers that fail in ways no real handler should, so that a
test can see the last-resort 500 go out over a real connection, and handlers that
raise the errors every handler may raise, so that a test can see their answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.web.server import Request

from login_token_module.api import JsonDict, ModuleApi
from login_token_module.errors import ServerBusyError, StorageUnavailableError
from login_token_module.http import JsonResource

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


FAULTY_MODULE = "tests.probe_module.FaultyModule"
# The faults FaultyModule serves, each under /_test/fault/<name>.
FAULTS = (
    "unencodable",
    "after_a_partial_write",
    "unwritable",
    "write_fails_once",
    "store_away",
    "busy",
    "raises",
    "waits_for_disconnect",
    "finishes_itself",
)


class FaultyResource(JsonResource):
    """A handler that answers what no real handler may: a body that cannot be encoded
    (a lone surrogate), after writing part of the response itself, on a request whose
    writes fail (all of them, or only the first), after its client has gone, or after
    finishing the response itself. Or it raises what a handler may: the store's server
    is away, the password queue is full, or a bug. It keeps each request, so a test can
    see how it ended."""

    def __init__(self, fault: str, requests: list[Request]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.fault = fault
        self.requests = requests

    async def on_GET(self, request: Request) -> tuple[int, JsonDict]:
        self.requests.append(request)
        if self.fault == "store_away":
            raise StorageUnavailableError("the test's store is away")
        if self.fault == "busy":
            raise ServerBusyError(retry_after_ms=2500)
        if self.fault == "raises":
            raise RuntimeError("a handler's bug")
        if self.fault == "waits_for_disconnect":
            # Answers only once its client has gone: the answer must go nowhere.
            with contextlib.suppress(Exception):
                await request.notifyFinish()
            return 200, {"text": "too late"}
        if self.fault == "finishes_itself":
            request.write(b"done")
            request.finish()
            return 200, {"text": "never sent"}
        if self.fault == "write_fails_once":
            write = request.write

            def fail_once(data: bytes) -> None:
                request.write = write  # type: ignore[method-assign]
                raise OSError("the first write failed")

            request.write = fail_once  # type: ignore[method-assign]
            return 200, {"text": "fine"}
        if self.fault == "after_a_partial_write":
            request.write(b"partial")
        elif self.fault == "unwritable":

            def refuse(data: bytes) -> None:
                raise OSError("the response cannot be written")

            request.write = refuse  # type: ignore[method-assign]
        return 200, {"text": "\ud800"}


class FaultyModule:
    """Serves each fault of FAULTS as a JSON resource of the host, as a module would."""

    def __init__(self, config: dict[str, Any], api: ModuleApi) -> None:
        self.requests: list[Request] = []
        for fault in FAULTS:
            api.register_web_resource(f"/_test/fault/{fault}", FaultyResource(fault, self.requests))

"""Matrix errors, shared by the module and any host that serves it."""

from __future__ import annotations

from typing import Any


class MatrixError(Exception):
    """An error answered to the client as ``{"errcode": ..., "error": ...}``.

    ``extra`` holds further top-level fields of the body (for example
    ``retry_after_ms``); ``headers`` holds response headers that go with it
    (for example ``Retry-After``).
    """

    def __init__(
        self,
        code: int,
        errcode: str,
        msg: str,
        *,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(msg)
        self.code = code
        self.errcode = errcode
        self.msg = msg
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"errcode": self.errcode, "error": self.msg}
        body.update(self.extra)
        return body


class StorageUnavailableError(Exception):
    """A database the request needs cannot be reached; the request changed nothing.

    Answered as 503 ``M_UNKNOWN``: the client may try again once the database is back.
    The message says what failed, for the log; it never reaches the client.
    """


class ServerBusyError(Exception):
    """Expensive work (a password check) was refused because its queue is full.

    Answered at once as 429 ``M_LIMIT_EXCEEDED`` with ``retry_after_ms``, rather
    than making the request wait behind everyone else's (an attacker's) work.
    """

    def __init__(self, retry_after_ms: int = 1000) -> None:
        super().__init__("too much work queued")
        self.retry_after_ms = retry_after_ms


def storage_unavailable() -> MatrixError:
    return MatrixError(
        503,
        Codes.UNKNOWN,
        "The server's database is unavailable; try again shortly",
        headers={"Retry-After": "5"},
    )


class Codes:
    """The Matrix error codes this project answers with."""

    FORBIDDEN = "M_FORBIDDEN"
    UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
    MISSING_TOKEN = "M_MISSING_TOKEN"
    BAD_JSON = "M_BAD_JSON"
    NOT_JSON = "M_NOT_JSON"
    NOT_FOUND = "M_NOT_FOUND"
    LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
    UNRECOGNIZED = "M_UNRECOGNIZED"
    UNKNOWN = "M_UNKNOWN"
    MISSING_PARAM = "M_MISSING_PARAM"
    INVALID_PARAM = "M_INVALID_PARAM"
    TOO_LARGE = "M_TOO_LARGE"
    USER_IN_USE = "M_USER_IN_USE"
    INVALID_USERNAME = "M_INVALID_USERNAME"


def rate_limited(retry_after_ms: int, message: str = "Too many requests") -> MatrixError:
    """A 429 with both the body field and the HTTP header clients look for."""
    retry_after_ms = max(0, int(retry_after_ms))
    seconds = max(1, -(-retry_after_ms // 1000))
    return MatrixError(
        429,
        Codes.LIMIT_EXCEEDED,
        message,
        extra={"retry_after_ms": retry_after_ms},
        headers={"Retry-After": str(seconds)},
    )

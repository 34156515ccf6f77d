"""JSON-over-HTTP plumbing for Twisted resources, shared by the module and hosts.

Handlers are coroutines ``on_GET`` / ``on_POST`` / ... that return
``(status, json_body)`` or raise :class:`MatrixError`. Everything that leaves
goes out as canonical JSON with CORS headers, and anything unexpected becomes a
500 ``M_UNKNOWN`` rather than a dropped connection.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from canonicaljson import encode_canonical_json
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from login_token_module.errors import (
    Codes,
    MatrixError,
    ServerBusyError,
    StorageUnavailableError,
    rate_limited,
    storage_unavailable,
)
from login_token_module.metrics import metrics
from login_token_module.safe_text import printable

logger = logging.getLogger(__name__)

JsonDict = dict[str, Any]
Handler = Callable[[Request], Awaitable[tuple[int, JsonDict]]]

CORS_HEADERS = {
    b"Access-Control-Allow-Origin": b"*",
    b"Access-Control-Allow-Methods": b"GET, HEAD, POST, PUT, DELETE, OPTIONS",
    b"Access-Control-Allow-Headers": b"X-Requested-With, Content-Type, Authorization, Date",
    b"Access-Control-Expose-Headers": b"Retry-After",
}


# Phrases Twisted does not know (it would say "Unknown Status").
_REASONS = {429: b"Too Many Requests", 413: b"Payload Too Large", 503: b"Service Unavailable"}


def set_cors_headers(request: Request) -> None:
    for name, value in CORS_HEADERS.items():
        request.setHeader(name, value)


def is_disconnected(request: Request) -> bool:
    return bool(getattr(request, "_disconnected", False)) or bool(request.finished)


def respond_json(
    request: Request,
    code: int,
    body: JsonDict,
    headers: dict[str, str] | None = None,
) -> None:
    """Write ``body`` as the whole response, unless the client has gone away.

    If the body cannot be encoded (a bug: every string in it should have been
    checked), a plain 500 goes out instead and the connection is closed, so the
    client is never left waiting.
    """
    if is_disconnected(request):
        return
    try:
        payload = encode_canonical_json(body)
        extra = [(name.encode("ascii"), value.encode("ascii")) for name, value in (headers or {}).items()]
    except Exception:
        logger.exception("Could not encode a %d answer; answering 500 instead", code)
        respond_internal_error(request)
        return
    request.setResponseCode(code, _REASONS.get(code))
    set_cors_headers(request)
    request.setHeader(b"Content-Type", b"application/json")
    # Responses can carry secrets (access and login tokens): never cache them.
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    for name_bytes, value_bytes in extra:
        request.setHeader(name_bytes, value_bytes)
    request.setHeader(b"Content-Length", str(len(payload)).encode("ascii"))
    if request.method != b"HEAD":
        request.write(payload)
    request.finish()


_INTERNAL_ERROR = encode_canonical_json({"errcode": Codes.UNKNOWN, "error": "Internal server error"})


def respond_internal_error(request: Request) -> None:
    """The last resort: a fixed 500, written without anything that could fail, then the
    connection closed (whatever state the request was left in)."""
    # Taken first: a finished request lets go of its channel (Twisted deletes the attribute).
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    try:
        if not request.startedWriting:
            request.setResponseCode(500)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Content-Length", str(len(_INTERNAL_ERROR)).encode("ascii"))
            request.setHeader(b"Connection", b"close")
            request.write(_INTERNAL_ERROR)
        if not request.finished:
            request.finish()
    except Exception:
        logger.exception("Could not write a 500 answer")
    finally:
        if transport is not None:
            transport.loseConnection()


def respond_error(request: Request, error: MatrixError) -> None:
    respond_json(request, error.code, error.to_json(), error.headers)


# What no string a client sends may hold: NUL (C strings and PostgreSQL text end there)
# and lone surrogates (no UTF-8 encoding exists, so writing them anywhere fails).
_FORBIDDEN_CHARS = re.compile("[\x00\ud800-\udfff]")
# A JSON key named in an error text only when it is short and plain; else "a key".
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def is_clean(text: str) -> bool:
    """Whether ``text`` holds no NUL and no lone surrogate."""
    return _FORBIDDEN_CHARS.search(text) is None


def _field_name(path: list[str | int]) -> str:
    parts = []
    for step in path:
        if isinstance(step, int):
            parts.append(f"[{step}]")
        else:
            name = step if _PLAIN_KEY.fullmatch(step) else "<key>"
            parts.append(name if not parts else f".{name}")
    return "".join(parts) or "the body"


def check_strings(value: Any) -> None:
    """400 ``M_BAD_JSON`` naming the field if any string in ``value`` (keys too, at any
    depth) holds NUL or a lone surrogate. Iterative: depth cannot exhaust the stack."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not is_clean(item):
                raise MatrixError(
                    400,
                    Codes.BAD_JSON,
                    f"'{_field_name(path)}' holds a character not allowed here (NUL or a lone surrogate)",
                )
        elif isinstance(item, dict):
            for key, child in item.items():
                if not is_clean(key):
                    raise MatrixError(
                        400,
                        Codes.BAD_JSON,
                        f"A key in '{_field_name(path)}' holds a character not allowed here"
                        " (NUL or a lone surrogate)",
                    )
                stack.append((child, [*path, key]))
        elif isinstance(item, list):
            stack.extend((child, [*path, index]) for index, child in enumerate(item))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError("a number too large for a double is not accepted")
    return number


def parse_json_object(request: Request, *, allow_empty: bool = False) -> JsonDict:
    """The request body as a JSON object, or a Matrix 400 saying what is wrong."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if allow_empty:
            return {}
        raise MatrixError(400, Codes.NOT_JSON, "Request body is empty; expected a JSON object")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MatrixError(400, Codes.NOT_JSON, "Content not JSON") from None
    if not isinstance(value, dict):
        raise MatrixError(400, Codes.BAD_JSON, "Content must be a JSON object")
    # The trust boundary: nothing past here sees a string that cannot be written back out.
    check_strings(value)
    return cast(JsonDict, value)


def client_address(request: Request) -> str | None:
    """The client's address as the host sees it (behind a trusted proxy: the proxy's
    X-Forwarded-For, which the host's request object already honours), or None."""
    host = getattr(request.getClientAddress(), "host", None)
    return host if isinstance(host, str) else None


def render_unrecognized(request: Request) -> Any:
    """404 ``M_UNRECOGNIZED``, the Matrix answer for a path nobody serves."""
    if request.method == b"OPTIONS":
        respond_json(request, 200, {})
    else:
        respond_json(request, 404, {"errcode": Codes.UNRECOGNIZED, "error": "Unrecognized request"})
    return NOT_DONE_YET


# The label of a request whose route or method is not one of the served ones, so that
# no text a client sends becomes a metric series.
OTHER = "other"
# Set on a request by whatever routed it to a JsonResource (the host's URL tree, the
# Synapse adapter): the path it was registered under, a fixed set.
ROUTE_ATTRIBUTE = "login_token_module_route"


def set_route(request: Request, path: str) -> None:
    setattr(request, ROUTE_ATTRIBUTE, path)


_SERVED_METHODS: dict[type, list[str]] = {}


class JsonResource(Resource):
    """A leaf resource whose ``on_<METHOD>`` coroutines answer JSON."""

    isLeaf = True

    def _allowed_methods(self) -> list[str]:
        methods = _SERVED_METHODS.get(type(self))
        if methods is None:
            methods = sorted(name[3:] for name in dir(self) if name.startswith("on_"))
            if "GET" in methods:
                methods.append("HEAD")
            methods = _SERVED_METHODS[type(self)] = [*methods, "OPTIONS"]
        return methods

    def render(self, request: Request) -> Any:
        handler = self.route(request)
        if handler is not None:
            defer.ensureDeferred(self.respond(handler, request))
        return NOT_DONE_YET

    def route(self, request: Request) -> Handler | None:
        """The handler for this request, or None once the request has been answered here.

        Split from :meth:`render` so that a host which must start coroutines its
        own way (Synapse, with its log contexts) can route, then run
        :meth:`respond` as it needs. Methods are case-sensitive (RFC 9110): ``gEt``
        is not GET, and gets 405.
        """
        method = request.method.decode("ascii", "replace")
        if request.postpath:
            # Reached as a leaf with path segments left over: not our path.
            render_unrecognized(request)
            return None
        if method == "OPTIONS":
            # CORS preflight: the headers are the answer.
            respond_json(request, 200, {})
            return None
        served = method in self._allowed_methods()
        handler: Handler | None = (
            getattr(self, f"on_{'GET' if method == 'HEAD' else method}", None) if served else None
        )
        if handler is None:
            respond_json(
                request,
                405,
                {"errcode": Codes.UNRECOGNIZED, "error": "Unrecognized request"},
                {"Allow": ", ".join(self._allowed_methods())},
            )
        return handler

    def _labels(self, request: Request) -> tuple[str, str, str]:
        """The metric labels of a request: its registered route, its method if served,
        its status; never the request's own spelling of them."""
        route = getattr(request, ROUTE_ATTRIBUTE, None)
        method = request.method.decode("ascii", "replace")
        return (
            route if isinstance(route, str) else OTHER,
            method if method in self._allowed_methods() else OTHER,
            str(request.code) if isinstance(request.code, int) else OTHER,
        )

    async def respond(self, handler: Handler, request: Request) -> None:
        """Run ``handler`` and write its answer, or its error, as the response
        (timed per endpoint in the request-latency histogram). Whatever fails,
        the request is answered."""
        started = time.perf_counter()
        try:
            await self._respond(handler, request)
        except Exception:
            logger.exception("Failed to answer a request; answering 500")
            respond_internal_error(request)
        finally:
            metrics().request_duration.labels(*self._labels(request)).observe(time.perf_counter() - started)

    async def _respond(self, handler: Handler, request: Request) -> None:
        try:
            code, body = await handler(request)
        except MatrixError as error:
            respond_error(request, error)
            return
        except StorageUnavailableError:
            # Logged (with the reason, throttled) where the database noticed it.
            respond_error(request, storage_unavailable())
            return
        except ServerBusyError as busy:
            respond_error(request, rate_limited(busy.retry_after_ms, "The server is busy; try again shortly"))
            return
        except Exception:
            # Log the failure without the request body: it may hold a password.
            logger.exception(
                "Unhandled error in %s %s",
                printable(request.method, 16),
                printable(request.path),
            )
            respond_json(request, 500, {"errcode": Codes.UNKNOWN, "error": "Internal server error"})
            return
        respond_json(request, code, body)

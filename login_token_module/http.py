"""JSON-over-HTTP plumbing for Twisted resources, shared by the module and hosts.

Handlers are coroutines ``on_GET`` / ``on_POST`` / ... that return
``(status, json_body)`` or raise :class:`MatrixError`. Everything that leaves
goes out as canonical JSON with CORS headers, and anything unexpected becomes a
500 ``M_UNKNOWN`` rather than a dropped connection.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from canonicaljson import encode_canonical_json
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from login_token_module.errors import Codes, MatrixError, StorageUnavailableError, storage_unavailable
from login_token_module.metrics import metrics

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
    """Write ``body`` as the whole response, unless the client has gone away."""
    if is_disconnected(request):
        return
    payload = encode_canonical_json(body)
    request.setResponseCode(code, _REASONS.get(code))
    set_cors_headers(request)
    request.setHeader(b"Content-Type", b"application/json")
    # Responses can carry secrets (access and login tokens): never cache them.
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    request.setHeader(b"Content-Length", str(len(payload)).encode("ascii"))
    if request.method != b"HEAD":
        request.write(payload)
    request.finish()


def respond_error(request: Request, error: MatrixError) -> None:
    respond_json(request, error.code, error.to_json(), error.headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(request: Request, *, allow_empty: bool = False) -> JsonDict:
    """The request body as a JSON object, or a Matrix 400 saying what is wrong."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        if allow_empty:
            return {}
        raise MatrixError(400, Codes.NOT_JSON, "Request body is empty; expected a JSON object")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MatrixError(400, Codes.NOT_JSON, "Content not JSON") from None
    if not isinstance(value, dict):
        raise MatrixError(400, Codes.BAD_JSON, "Content must be a JSON object")
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


class JsonResource(Resource):
    """A leaf resource whose ``on_<METHOD>`` coroutines answer JSON."""

    isLeaf = True

    def _allowed_methods(self) -> list[str]:
        methods = sorted(name[3:] for name in dir(self) if name.startswith("on_"))
        if "GET" in methods:
            methods.append("HEAD")
        return [*methods, "OPTIONS"]

    def render(self, request: Request) -> Any:
        handler = self.route(request)
        if handler is not None:
            defer.ensureDeferred(self.respond(handler, request))
        return NOT_DONE_YET

    def route(self, request: Request) -> Handler | None:
        """The handler for this request, or None once the request has been answered here.

        Split from :meth:`render` so that a host which must start coroutines its
        own way (Synapse, with its log contexts) can route, then run
        :meth:`respond` as it needs.
        """
        method = request.method.decode("ascii", "replace").upper()
        if request.postpath:
            # Reached as a leaf with path segments left over: not our path.
            render_unrecognized(request)
            return None
        if method == "OPTIONS":
            # CORS preflight: the headers are the answer.
            respond_json(request, 200, {})
            return None
        handler: Handler | None = getattr(self, f"on_{'GET' if method == 'HEAD' else method}", None)
        if handler is None:
            respond_json(
                request,
                405,
                {"errcode": Codes.UNRECOGNIZED, "error": "Unrecognized request"},
                {"Allow": ", ".join(self._allowed_methods())},
            )
        return handler

    async def respond(self, handler: Handler, request: Request) -> None:
        """Run ``handler`` and write its answer, or its error, as the response
        (timed per endpoint in the request-latency histogram)."""
        started = time.perf_counter()
        try:
            await self._respond(handler, request)
        finally:
            metrics().request_duration.labels(
                request.path.decode("ascii", "replace"),
                request.method.decode("ascii", "replace"),
                str(request.code),
            ).observe(time.perf_counter() - started)

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
        except Exception:
            # Log the failure without the request body: it may hold a password.
            logger.exception(
                "Unhandled error in %s %s",
                request.method.decode("ascii", "replace"),
                request.path.decode("ascii", "replace"),
            )
            respond_json(request, 500, {"errcode": Codes.UNKNOWN, "error": "Internal server error"})
            return
        respond_json(request, code, body)

"""The approval page (``verification_uri``): a phone's browser approves or denies a code.

Plain HTML forms, no JavaScript: enter (or confirm) the code, see what asks
(its name, its address, when), then sign in with the Matrix user id and
password and press Approve or Deny, in one POST. The password goes through the
same checks and limits as UIA (``Pairings.decide_in_page``).

Every answer carries ``Content-Security-Policy`` (nothing may run, nothing may
frame it), ``Cache-Control: no-store``, ``Referrer-Policy: no-referrer``. The
form is protected against cross-site requests by a double-submit token: a
random value in a ``SameSite=Strict``, ``HttpOnly`` cookie, repeated in a hidden
field, compared in constant time. Nothing secret is put in a URL (the code in
``?code=`` is what the new device shows on its screen anyway).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from jinja2 import Environment, PackageLoader, select_autoescape
from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from login_token_module.errors import Codes, MatrixError, ServerBusyError, StorageUnavailableError
from login_token_module.http import client_address, is_clean, is_disconnected
from login_token_module.pairing import PAGE_PATH, Pairings, shown
from login_token_module.stores import Pairing

logger = logging.getLogger("login_token_module.module")

CSRF_COOKIE = b"login_token_pair_csrf"
CSRF_FIELD = "csrf_token"
MAX_FORM_BYTES = 8 * 1024
MAX_PASSWORD = 1024
HEADERS = {
    b"Content-Type": b"text/html; charset=utf-8",
    b"Content-Security-Policy": b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
    b" frame-ancestors 'none'; base-uri 'none'",
    b"X-Frame-Options": b"DENY",
    b"Cache-Control": b"no-store",
    b"Referrer-Policy": b"no-referrer",
    b"X-Content-Type-Options": b"nosniff",
}

_templates = Environment(
    loader=PackageLoader("login_token_module", "templates"),
    autoescape=select_autoescape(["html"]),
)


def _count(number: int, unit: str) -> str:
    """``1 second``, ``2 seconds``."""
    return f"{number} {unit}" if number == 1 else f"{number} {unit}s"


def _ago(milliseconds: int) -> str:
    """How long ago a device asked, as the page says it: whole seconds under a minute,
    then whole minutes (a clock that went back reads as just now)."""
    seconds = max(0, milliseconds // 1000)
    if seconds < 60:
        return f"{_count(seconds, 'second')} ago"
    return f"{_count(seconds // 60, 'minute')} ago"


class PairPageResource(Resource):
    isLeaf = True

    def __init__(
        self, pairings: Pairings, server_name: str, now: Callable[[], float], *, secure_cookie: bool = False
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._pairings = pairings
        self._server_name = server_name
        self._now = now
        # Secure even when the request reached us as plain HTTP: behind a TLS proxy
        # (an https public_baseurl) the browser's side is https.
        self._secure_cookie = secure_cookie

    # What the page answers (HEAD as GET); any other method gets Twisted's 405.
    METHODS = (b"GET", b"HEAD", b"POST")

    def render_GET(self, request: Request) -> Any:
        defer.ensureDeferred(self.serve(request))
        return NOT_DONE_YET

    def render_POST(self, request: Request) -> Any:
        defer.ensureDeferred(self.serve(request))
        return NOT_DONE_YET

    async def serve(self, request: Request) -> None:
        """Answer one request of ``METHODS`` (a host with its own way of running request
        handlers, as Synapse's log contexts, calls this rather than ``render``)."""
        handler = self._post if request.method == b"POST" else self._get
        try:
            await handler(request)
        except StorageUnavailableError:
            self._page(
                request, 503, "enter", message="The server cannot reach its database; try again shortly."
            )
        except ServerBusyError:
            # The password checks' queue is full (a flood of them): refused at once, as
            # the JSON endpoints refuse it, without a traceback per refused form.
            self._page(request, 429, "enter", message="The server is busy; wait a moment, then try again.")
        except Exception:
            logger.exception("Failed to answer the pairing page")
            self._page(request, 500, "enter", message="Something went wrong on the server.")

    # -- the two requests ------------------------------------------------------------

    async def _get(self, request: Request) -> None:
        codes = request.args.get(b"code") if request.args else None
        if not codes:
            self._page(request, 200, "enter")
            return
        typed = codes[0].decode("utf-8", "replace") if len(codes) == 1 else ""
        try:
            pairing = await self._pairings.look_up(typed, client_address(request))
        except MatrixError as error:
            self._error_page(request, error)
            return
        self._decide_page(request, 200, pairing)

    async def _post(self, request: Request) -> None:
        form = self._form(request)
        if form is None:
            self._page(request, 400, "enter", message="The form could not be read; start again.")
            return
        cookie: bytes | None = request.getCookie(CSRF_COOKIE)
        field = form.get(CSRF_FIELD, "")
        if cookie is None or not field or not hmac.compare_digest(cookie, field.encode("utf-8")):
            self._page(
                request,
                403,
                "enter",
                message="This form has expired or did not come from this page; start again.",
            )
            return
        address = client_address(request)
        code, typed_user, password = form.get("code", ""), form.get("user", ""), form.get("password", "")
        action = form.get("action")
        if action not in ("approve", "deny") or len(password) > MAX_PASSWORD:
            self._page(request, 400, "enter", message="The form could not be read; start again.")
            return
        user_id = self._pairings.page_user(typed_user)
        try:
            if user_id is None:
                pairing = await self._pairings.look_up(code, address)
                self._decide_page(
                    request, 403, pairing, message="Wrong user id or password.", user=typed_user
                )
                return
            answer = await self._pairings.decide_in_page(
                user_id, password, code, action == "approve", address
            )
        except MatrixError as error:
            if error.code == 401:
                try:
                    pairing = await self._pairings.look_up(code, address)
                except MatrixError as again:
                    self._error_page(request, again)
                    return
                self._decide_page(
                    request, 403, pairing, message="Wrong user id or password.", user=typed_user
                )
                return
            self._error_page(request, error)
            return
        if action == "approve":
            name = answer.get("initial_device_display_name") or "The new device"
            message = f"Approved. {name} signs in as {user_id} in a moment."
        else:
            message = "Denied. The device was not signed in."
        self._page(request, 200, "result", message=message, message_kind="done")

    # -- reading and writing ---------------------------------------------------------

    def _form(self, request: Request) -> dict[str, str] | None:
        """The urlencoded form, each field once and clean; None if it is anything else."""
        raw = request.content.read(MAX_FORM_BYTES + 1) if request.content is not None else b""
        if len(raw) > MAX_FORM_BYTES:
            return None
        try:
            fields = parse_qs(raw.decode("ascii"), keep_blank_values=True, max_num_fields=10, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return None
        form: dict[str, str] = {}
        for name, values in fields.items():
            if len(values) != 1 or not is_clean(name) or not is_clean(values[0]):
                return None
            form[name] = values[0]
        return form

    def _csrf_token(self, request: Request) -> str:
        """This browser's form token: its cookie's, or a new one set now."""
        cookie: bytes | None = request.getCookie(CSRF_COOKIE)
        if cookie is not None and len(cookie) == 43 and cookie.isascii():
            return cookie.decode("ascii")
        token = secrets.token_urlsafe(32)
        request.addCookie(
            CSRF_COOKIE,
            token.encode("ascii"),
            path=PAGE_PATH.encode("ascii"),
            max_age=b"3600",
            httpOnly=True,
            secure=self._secure_cookie or request.isSecure(),
            sameSite="strict",
        )
        return token

    def _error_page(self, request: Request, error: MatrixError) -> None:
        if error.errcode == Codes.LIMIT_EXCEEDED:
            wait = max(1, int(error.extra.get("retry_after_ms", 1000)) // 1000)
            message = f"Too many attempts. Wait {_count(wait, 'second')}, then try again."
        elif error.code == 404:
            message = "No device is waiting with this code. Check the code, or start again on the new device."
        else:
            message = "This could not be done; start again."
        self._page(request, error.code, "enter", message=message)

    def _decide_page(
        self, request: Request, code: int, pairing: Pairing, *, message: str | None = None, user: str = ""
    ) -> None:
        now_ms = int(self._now() * 1000)
        self._page(
            request,
            code,
            "decide",
            message=message,
            user_code=shown(pairing.user_code),
            display_name=pairing.display_name,
            client_address=pairing.client_address,
            asked=_ago(now_ms - pairing.created_at_ms),
            user=user[:255],
            csrf_token=self._csrf_token(request),
        )

    def _page(self, request: Request, code: int, step: str, **values: Any) -> None:
        if is_disconnected(request):
            return
        values.setdefault("message_kind", "error")
        html = _templates.get_template("pair.html").render(
            step=step, page_path=PAGE_PATH, server_name=self._server_name, **values
        )
        payload = html.encode("utf-8")
        request.setResponseCode(code)
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"Content-Length", str(len(payload)).encode("ascii"))
        if request.method != b"HEAD":
            request.write(payload)
        request.finish()

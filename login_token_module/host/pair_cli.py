"""``login-token-module pair``: a reference new device, signed in by code.

Starts a pairing on the homeserver, prints the code, the approval URL and a QR
code of ``verification_uri_complete`` (segno), polls at the interval the server
asks for, signs in with the login token it is given, and writes
``{"homeserver", "user_id", "device_id", "access_token"}`` to a file created
with mode 0600. It prints the user id and the device id, never the access
token. This is what a bot, a command-line client or a headless box runs.

A plain synchronous HTTP client (urllib): the command runs no reactor.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TextIO

from login_token_module.pairing import POLL_PATH, START_PATH
from login_token_module.safe_text import printable

LOGIN_PATH = "/_matrix/client/v3/login"
HOMESERVER_RE = re.compile(r"https?://[^\s/?#]+(/[^\s?#]*)?")
# Answers larger than this are not read (a misbehaving server cannot fill memory).
MAX_ANSWER = 64 * 1024


class PairError(Exception):
    """Why pairing stopped, in one line for the person at the terminal."""


# As curl does, the environment's *_proxy variables are honoured.
_OPENER = urllib.request.build_opener()


def call(base: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON; the status and the JSON object answered (``{}`` if none)."""
    # The scheme is http or https: ``pair`` checked --homeserver (HOMESERVER_RE).
    request = urllib.request.Request(  # noqa: S310
        base + path,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json", "Accept": "application/json"},
        method="POST",
    )
    try:
        with _OPENER.open(request, timeout=30) as response:
            status, raw = response.status, response.read(MAX_ANSWER)
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read(MAX_ANSWER)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise PairError(f"cannot reach the homeserver: {printable(str(reason), 120)}") from None
    try:
        answer = json.loads(raw) if raw else {}
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise PairError(f"the homeserver answered {status} with something that is not a JSON object")
    return status, answer


def _error_text(answer: dict[str, Any]) -> str:
    errcode = answer.get("errcode")
    error = answer.get("error")
    parts = [printable(str(part), 120) for part in (errcode, error) if isinstance(part, str)]
    return ": ".join(parts) or "no reason given"


def _string(answer: dict[str, Any], key: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or not value:
        raise PairError(f"the homeserver's answer has no '{key}'")
    return value


def _whole(answer: dict[str, Any], key: str, default: int) -> int:
    value = answer.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return default
    return value


def qr_code(text: str) -> Any:
    import segno

    return segno.make(text, error="m")


def write_credentials(path: str, credentials: dict[str, str]) -> None:
    """Write ``credentials`` to ``path`` with mode 0600 (never readable by others, not even
    for a moment): a private temporary file beside it, renamed over it."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".credentials-", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(credentials, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def pair(
    homeserver: str,
    credentials_path: str,
    device_name: str | None = None,
    *,
    qr_png: str | None = None,
    out: TextIO = sys.stdout,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    """Run the whole new-device side; the credentials written (the caller prints no token)."""
    if not HOMESERVER_RE.fullmatch(homeserver):
        raise PairError("--homeserver must be an http or https URL, such as https://matrix.example.org")
    base = homeserver.rstrip("/")
    folder = os.path.dirname(os.path.abspath(credentials_path))
    if not os.path.isdir(folder):
        raise PairError(f"--credentials: the folder {printable(folder, 200)} does not exist")

    body = {} if device_name is None else {"initial_device_display_name": device_name}
    status, started = call(base, START_PATH, body)
    if status == 404:
        raise PairError("this homeserver does not offer pairing (pairing.enabled is off, or no module)")
    if status != 200:
        raise PairError(f"could not start a pairing ({status} {_error_text(started)})")
    pairing_id = _string(started, "pairing_id")
    user_code = printable(_string(started, "user_code"), 20)
    uri = _string(started, "verification_uri")
    complete = _string(started, "verification_uri_complete")
    interval = max(_whole(started, "interval_ms", 5000), 100) / 1000
    expires_in = _whole(started, "expires_in_ms", 600_000) / 1000

    code = qr_code(complete)
    if qr_png is not None:
        code.save(qr_png, kind="png", scale=8, border=4)
    print(f"To sign this device in, approve the code {user_code}", file=out)
    print(f"on a device where you are signed in, at {printable(uri, 300)}", file=out)
    print("or scan this QR code with your phone:", file=out)
    code.terminal(out=out, compact=True)
    print(f"Waiting for approval (the code expires in {round(expires_in / 60)} minutes)...", file=out)
    out.flush()

    deadline = time.monotonic() + expires_in + 30
    while True:
        sleep(interval)
        if time.monotonic() > deadline:
            raise PairError("the code expired before it was approved; run the command again")
        status, answer = call(base, POLL_PATH, {"pairing_id": pairing_id})
        if status == 429:
            # Slow down as asked, and from now on poll a little less often.
            sleep(_whole(answer, "retry_after_ms", 1000) / 1000)
            interval += 1
            continue
        if status == 404:
            raise PairError("the code expired before it was approved; run the command again")
        if status != 200:
            raise PairError(f"polling failed ({status} {_error_text(answer)})")
        outcome = answer.get("status")
        if outcome == "pending":
            continue
        if outcome == "denied":
            raise PairError("the code was denied on the approving device")
        if outcome == "approved":
            login_token = _string(answer, "login_token")
            break
        raise PairError("the homeserver answered the poll with an unknown status")

    login: dict[str, Any] = {"type": "m.login.token", "token": login_token}
    if device_name is not None:
        login["initial_device_display_name"] = device_name
    status, signed_in = call(base, LOGIN_PATH, login)
    if status != 200:
        raise PairError(f"signing in with the login token failed ({status} {_error_text(signed_in)})")
    credentials = {
        "homeserver": base,
        "user_id": _string(signed_in, "user_id"),
        "device_id": _string(signed_in, "device_id"),
        "access_token": _string(signed_in, "access_token"),
    }
    write_credentials(credentials_path, credentials)
    print(
        f"Signed in as {printable(credentials['user_id'], 300)},"
        f" device {printable(credentials['device_id'], 100)}",
        file=out,
    )
    print(f"Credentials written to {printable(credentials_path, 300)} (readable only by you)", file=out)
    return credentials

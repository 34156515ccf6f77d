"""Access tokens: minting, and finding who a request comes from."""

from __future__ import annotations

import hashlib
import secrets

from twisted.web.server import Request

from login_token_module.api import Requester
from login_token_module.errors import Codes, MatrixError
from login_token_module.host import database
from login_token_module.http import is_clean
from login_token_module.stores.engines.connection import Database

ACCESS_TOKEN_PREFIX = "mat_"


def new_access_token() -> str:
    return ACCESS_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_access_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def access_token_from_request(request: Request) -> str | None:
    """The bearer token from the Authorization header, or the deprecated query parameter."""
    raw = request.getHeader(b"Authorization")
    if raw is not None:
        scheme, _, token = raw.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise MatrixError(401, Codes.MISSING_TOKEN, "Authorization header must be 'Bearer <token>'")
        return _checked(token.strip(), "the Authorization header")
    values = (request.args or {}).get(b"access_token")
    if values:
        first: bytes = values[0]
        return _checked(first.decode("utf-8", "replace"), "'access_token'")
    return None


def _checked(token: str, field: str) -> str:
    if not is_clean(token):
        raise MatrixError(400, Codes.INVALID_PARAM, f"{field} holds a character not allowed here (NUL)")
    return token


async def get_user_by_req(db: Database, request: Request) -> Requester:
    token = access_token_from_request(request)
    if token is None:
        raise MatrixError(401, Codes.MISSING_TOKEN, "Missing access token")
    owner = await db.run(database.get_access_token_owner, hash_access_token(token))
    if owner is None:
        raise MatrixError(
            401, Codes.UNKNOWN_TOKEN, "Unknown or expired access token", extra={"soft_logout": False}
        )
    return Requester(user_id=owner[0], device_id=owner[1])

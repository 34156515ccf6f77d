"""The audit trail: one structured log record per token issued, spent, refused or revoked.

Records go to the ``login_token_module.audit`` logger at INFO. Each carries its
fields twice: in the message (``key=value``, for plain log files) and as
``record.audit`` (a dict, which :class:`JsonFormatter` writes as JSON fields for
log shippers). A record never holds a token, a password or an access token:
a token appears only as its fingerprint, the first 8 hex digits of its SHA-256
(32 bits of a hash of 256 random bits: enough to tell tokens apart in a log,
nothing to find the token with). The stored hash starts with the same digits,
so ``login-token-module tokens revoke --fingerprint`` finds the token.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from typing import Any

from login_token_module.safe_text import logfmt_value

AUDIT_LOGGER = "login_token_module.audit"
FINGERPRINT_HEX_DIGITS = 8

# Every record has all of these keys (None where a value does not apply or is unknown).
FIELDS = (
    "event",
    "outcome",
    "user_id",
    "minted_by_device",
    "new_device_id",
    "client_address",
    "token_fingerprint",
)

logger = logging.getLogger(AUDIT_LOGGER)


def fingerprint_of_hash(token_hash: bytes) -> str:
    """A token's fingerprint from its stored SHA-256."""
    return token_hash[: FINGERPRINT_HEX_DIGITS // 2].hex()


def fingerprint(token: str) -> str:
    """A token's fingerprint: the first 8 hex digits of its SHA-256."""
    return fingerprint_of_hash(hashlib.sha256(token.encode("utf-8")).digest())


def record(event: str, outcome: str, **fields: Any) -> None:
    """Log one audit record; ``fields`` among :data:`FIELDS` (others are added after them)."""
    data: dict[str, Any] = dict.fromkeys(FIELDS)
    data.update(fields)
    data["event"] = event
    data["outcome"] = outcome
    # Quoted and escaped where needed (a device id is the client's choice): one event, one line.
    text = " ".join(f"{key}={logfmt_value(value)}" for key, value in data.items())
    logger.info("login token %s", text, extra={"audit": data})


# Set by ``serve --workers N`` in each worker, so JSON records say which process wrote them.
PROCESS_NAME: str | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and an audit record's fields.

    Use it from a ``log_config`` file::

        formatters:
          json: {(): login_token_module.audit.JsonFormatter}
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if PROCESS_NAME is not None:
            entry["process"] = PROCESS_NAME
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            entry.update(audit)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def fingerprint_prefix(text: str) -> bytes:
    """The leading bytes of a token hash that a fingerprint (8 to 64 hex digits) names.

    Raises ValueError for anything else.
    """
    text = text.strip().lower()
    if not FINGERPRINT_HEX_DIGITS <= len(text) <= 64 or len(text) % 2:
        raise ValueError("a fingerprint is 8 (or more, an even number up to 64) hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ValueError("a fingerprint is made of hex digits (0-9, a-f)") from None

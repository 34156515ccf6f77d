"""Checking a password against the hash Synapse stores, exactly as Synapse checks it.

Synapse hashes ``NFKC(password)`` encoded as UTF-8, followed by its
``password_config.pepper``, cut to the 72 bytes bcrypt reads, with bcrypt. A
check that skipped any step would refuse passwords that log in: a non-ASCII
password typed in another normal form, any password on a peppered server, and
any password longer than 72 bytes (which bcrypt 5 refuses outright).

These functions block (bcrypt) and run in a thread; they never log a password.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import bcrypt

BCRYPT_MAX_BYTES = 72


def bcrypt_input(password: str, pepper: str) -> bytes:
    """The bytes Synapse hands to bcrypt for ``password``."""
    normalised = unicodedata.normalize("NFKC", password)
    return (normalised.encode("utf-8") + pepper.encode("utf-8"))[:BCRYPT_MAX_BYTES]


def check_password(password: str, pepper: str, stored_hash: str) -> bool:
    """Whether ``password`` matches Synapse's stored bcrypt hash."""
    try:
        return bcrypt.checkpw(bcrypt_input(password, pepper), stored_hash.encode("ascii"))
    except ValueError:
        # A stored value that is not a bcrypt hash: no password can match it.
        return False


def select_password_hash(txn: Any, user_id: str) -> str | None:
    """The user's stored password hash, in a Synapse database transaction (None: none set)."""
    txn.execute("SELECT password_hash FROM users WHERE name = ?", (user_id,))
    row = txn.fetchone()
    if row is None or not row[0]:
        return None
    return str(row[0])

"""Revoking login tokens Synapse minted for the module, knowing only their hashes.

Synapse keeps its login tokens in its ``login_tokens`` table (the token
itself, ``user_id``, ``expiry_ts``, ``used_ts``). The module never stores a
token: it remembers the SHA-256 of each one it asked for. To revoke, it reads
the user's unused, unexpired tokens in a Synapse database transaction, hashes
each, and deletes those whose hash it was given; Synapse's login then refuses
them (403 M_FORBIDDEN) like any token it does not know.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import Any


def invalidate_unused_tokens(
    txn: Any, user_id: str, token_hashes: Collection[bytes], now_ms: int
) -> list[bytes]:
    """Delete the user's unused tokens whose SHA-256 is in ``token_hashes``; their hashes."""
    txn.execute(
        "SELECT token FROM login_tokens WHERE user_id = ? AND used_ts IS NULL AND expiry_ts > ?",
        (user_id, now_ms),
    )
    found: list[bytes] = []
    for (token,) in txn.fetchall():
        token_hash = hashlib.sha256(str(token).encode("utf-8")).digest()
        if token_hash in token_hashes:
            txn.execute("DELETE FROM login_tokens WHERE token = ? AND used_ts IS NULL", (token,))
            found.append(token_hash)
    return found


def device_signed_in(txn: Any, user_id: str, device_id: str) -> bool:
    """Whether the device holds an access token in Synapse's database (a logout deletes
    them before it tells modules), in a Synapse database transaction."""
    txn.execute(
        "SELECT 1 FROM access_tokens WHERE user_id = ? AND device_id = ? LIMIT 1", (user_id, device_id)
    )
    return txn.fetchone() is not None

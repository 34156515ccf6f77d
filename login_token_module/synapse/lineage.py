"""Lineage inside Synapse: which token signed which new device in, from Synapse's own rows.

Synapse's own login spends the tokens the module asks for, so the module never
sees the spend as the reference host does. Synapse records enough to know it
afterwards, reliably, through its public ``create_login_token``:

- the module mints each token with ``auth_provider_id`` :data:`PROVIDER_ID` and
  an ``auth_provider_session_id`` of its own (random, no secret), which Synapse
  keeps on the token's row in ``login_tokens``;
- Synapse's ``m.login.token`` login hands both to the device it creates, and
  stores them with it in ``device_auth_providers`` (the table single sign-on's
  back-channel logout reads; no identity provider of Synapse's is named
  :data:`PROVIDER_ID`, so nothing logs these devices out);
- it then calls the account-validity ``on_user_login`` callbacks with the user,
  the login type and that provider id, on the process that served ``/login``.

On that callback, :func:`record_spends` joins the two rows (token, session id,
``used_ts``; session id, new device) for the user's spent tokens and marks each
one's history spent, at Synapse's ``used_ts``, with the new device, as the
reference host does at its spend; the module's row for revocation goes. It
finds every spend of the user's not recorded yet, so a callback that failed
(its database unreachable) is made up for by the user's next token login, as
long as Synapse still keeps the spent token's row.

What this changes in Synapse: the token login's device has a
``device_auth_providers`` row, and Synapse's login metric
(``synapse_user_logins_total``) and other modules' login callbacks see
:data:`PROVIDER_ID` as the login's provider.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from login_token_module.stores.engines.connection import Conn
from login_token_module.synapse.storage import SynapseConn
from login_token_module.tokens import hash_token

# The auth_provider_id of the tokens the module mints in Synapse (no SSO provider's id).
PROVIDER_ID = "login_token_module"
TOKEN_LOGIN = "m.login.token"


def new_session_id() -> str:
    """A token's ``auth_provider_session_id``: random, so that it names one token."""
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class Spend:
    token_hash: bytes
    user_id: str
    minted_by_device: str | None
    new_device_id: str
    spent_at_ms: int


_SPENT_IN_SYNAPSE = (
    "SELECT t.token, t.used_ts, d.device_id FROM login_tokens AS t"
    " JOIN device_auth_providers AS d ON d.user_id = t.user_id"
    " AND d.auth_provider_id = t.auth_provider_id"
    " AND d.auth_provider_session_id = t.auth_provider_session_id"
    " WHERE t.user_id = ? AND t.auth_provider_id = ? AND t.used_ts IS NOT NULL"
)


def record_spends(conn: Conn, user_id: str) -> list[Spend]:
    """Mark in the history each of the user's tokens Synapse has spent since the last
    call, with the device its login created; those spends (in one transaction)."""
    assert isinstance(conn, SynapseConn)
    found = conn.execute_synapse(_SPENT_IN_SYNAPSE, (user_id, PROVIDER_ID)).fetchall()
    spends: list[Spend] = []
    for token, used_ts, new_device in found:
        token_hash = hash_token(str(token))
        marked = conn.execute(
            "UPDATE login_token_history SET outcome = 'spent', finished_at_ms = ?, new_device_id = ?"
            " WHERE token_hash = ? AND user_id = ? AND outcome IS NULL",
            (int(used_ts), str(new_device), token_hash, user_id),
        ).rowcount
        if marked != 1:
            continue  # recorded already (or its history is gone)
        row = conn.execute(
            "DELETE FROM login_tokens WHERE token_hash = ? RETURNING device_id", (token_hash,)
        ).fetchone()
        minted_by = None if row is None or row[0] is None else str(row[0])
        spends.append(Spend(token_hash, user_id, minted_by, str(new_device), int(used_ts)))
    return spends

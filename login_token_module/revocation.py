"""Revocation: outstanding tokens die with the device that minted them.

At logout (the host's ``on_logged_out`` callback, when ``revoke_on_logout`` is
set) every token the device minted and did not spend is revoked; a token
minted while its device logs out is revoked on its own (see ``issuing.py``).
Each revocation is counted and audited here, the operators' too (the ``tokens
revoke`` command, ``host/tokens_cli.py``, revokes by user or fingerprint).
"""

from __future__ import annotations

from collections.abc import Callable

from login_token_module import audit
from login_token_module.metrics import Metrics
from login_token_module.stores import TokenInfo, TokenStore
from login_token_module.stores.timed import HostTokens


class Revocation:
    def __init__(
        self,
        *,
        tokens: TokenStore,
        host: HostTokens | None,
        revoke_on_logout: bool,
        metrics: Metrics,
        now: Callable[[], float],
    ) -> None:
        # ``host``: where the host mints the tokens itself (None: the module does).
        # ``tokens``: the module's token store, or the hashes of the host's tokens
        # with the devices that minted them, noted beside the host's.
        self._tokens = tokens
        self._host = host
        self._revoke_on_logout = revoke_on_logout
        self._metrics = metrics
        self._now = now

    async def on_logged_out(self, user_id: str, device_id: str | None, access_token: str) -> None:
        """Synapse's on_logged_out callback: revoke the tokens this device minted and did not spend.

        A session without a device (an application service) mints tokens no
        logout can revoke by device; an operator revokes them by user.
        """
        if not self._revoke_on_logout or device_id is None:
            return
        now_ms = int(self._now() * 1000)
        if self._host is not None:
            minted = await self._tokens.revoke_tokens(user_id, now_ms, device_id=device_id)
            if not minted:
                return
            found = set(
                await self._host.invalidate_login_tokens(user_id, [info.token_hash for info in minted])
            )
            # Those the host no longer had were spent (or swept) already.
            revoked = [info for info in minted if info.token_hash in found]
        else:
            revoked = await self._tokens.revoke_tokens(user_id, now_ms, device_id=device_id)
        self.record_revoked(revoked, "logout")

    async def revoke_one(self, user_id: str, token_hash: bytes) -> None:
        """Revoke one token of ``user_id`` (minted while its device logged out)."""
        now_ms = int(self._now() * 1000)
        revoked = await self._tokens.revoke_fingerprint(token_hash.hex(), now_ms)
        if self._host is not None:
            await self._host.invalidate_login_tokens(user_id, [token_hash])
        self.record_revoked(revoked, "logout")

    def record_revoked(self, revoked: list[TokenInfo], reason: str) -> None:
        record_revoked(self._metrics, revoked, reason)


def record_revoked(metrics: Metrics, revoked: list[TokenInfo], reason: str) -> None:
    """Count and audit each revoked token (``reason``: ``logout``, or ``operator``
    for the ``tokens revoke`` command)."""
    for info in revoked:
        metrics.tokens_revoked.labels(reason).inc()
        audit.record(
            "revoke",
            "revoked",
            user_id=info.user_id,
            minted_by_device=info.minted_by_device,
            token_fingerprint=audit.fingerprint_of_hash(info.token_hash),
            reason=reason,
        )

"""Pairing: sign in a device that cannot type a password, by a short code.

OAuth's device authorization grant (RFC 8628), on login tokens. Three roles:

- the new device **starts** a pairing (no access token) and gets a secret
  ``pairing_id`` and a ``user_code`` to show (``XXXX-XXXX``);
- a signed-in device **approves** the code (after the same User-Interactive
  Auth as get_token: approving is minting, under get_token's allowance and
  lifetime) or **denies** it;
- the new device **polls** with its ``pairing_id`` until the login token is
  delivered to it, once, and signs in with ``m.login.token``.

Only the SHA-256 of the pairing_id is stored. The minted token waits for
delivery sealed to a public key derived from the pairing_id (X25519, then
ChaCha20-Poly1305): the store holds the public half, the new device holds the
only way to the private half, so the database alone never yields a usable
token. It is kept only until delivered, or until it or the pairing expires.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from login_token_module import audit, tokens
from login_token_module.api import JsonDict, Requester
from login_token_module.config import PairingConfig
from login_token_module.errors import Codes, MatrixError, rate_limited
from login_token_module.issuing import Issuing
from login_token_module.metrics import Metrics
from login_token_module.revocation import Revocation
from login_token_module.stores import Pairing, PairingStore, RateLimitStore
from login_token_module.uia_flow import PASSWORD_STAGE, UiaFlow

logger = logging.getLogger("login_token_module.module")

PAIR_PREFIX = "/_synapse/client/login_token/pair"
START_PATH = PAIR_PREFIX + "/start"
POLL_PATH = PAIR_PREFIX + "/poll"
APPROVE_PATH = PAIR_PREFIX + "/approve"
DENY_PATH = PAIR_PREFIX + "/deny"
# The page a person opens to approve (``verification_uri``).
PAGE_PATH = PAIR_PREFIX

# RFC 8628's alphabet without look-alikes: 20 consonants, 8 of them, 20^8 codes (34 bits).
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8
# 256 random bits, base64url.
PAIRING_ID_BYTES = 32
MAX_PAIRING_ID_LENGTH = 128
MAX_USER_CODE_LENGTH = 32
MAX_DISPLAY_NAME_LENGTH = 100
# Pending pairings one client address may hold at once, and how often it may start one.
MAX_PENDING_PER_ADDRESS = 10
START_LIMIT = (1 / 6, 10)
# Wrong codes (approve, deny, look-up), per user and per address: 5, then one per 20 s.
WRONG_CODE_LIMIT = (1 / 20, 5)

_SEAL_INFO = b"login_token_module pairing seal v1"
_KEY_INFO = b"login_token_module pairing key v1"


def pairing_hash(pairing_id: str) -> bytes:
    """What the store keys a pairing by: never the pairing_id itself."""
    return hashlib.sha256(pairing_id.encode("utf-8")).digest()


def _private_key(pairing_id: str) -> X25519PrivateKey:
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(
        pairing_id.encode("utf-8")
    )
    return X25519PrivateKey.from_private_bytes(seed)


def seal_key(pairing_id: str) -> bytes:
    """The public key a pairing's token is sealed to (stored with the pairing)."""
    return _private_key(pairing_id).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _cipher(shared: bytes, ephemeral: bytes, recipient: bytes) -> ChaCha20Poly1305:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=_SEAL_INFO).derive(
        shared
    )
    return ChaCha20Poly1305(key)


_NONCE = bytes(12)  # each key seals one message (a fresh ephemeral key per seal)


def seal(recipient: bytes, token: str) -> bytes:
    """``token`` sealed to the public key ``recipient``: only its pairing_id opens it."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient))
    sealed = _cipher(shared, ephemeral_public, recipient).encrypt(_NONCE, token.encode("utf-8"), None)
    return ephemeral_public + sealed


def unseal(pairing_id: str, sealed: bytes) -> str | None:
    """The token ``seal`` sealed for this pairing_id, or None if it is not one."""
    private = _private_key(pairing_id)
    recipient = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    ephemeral_public, box = sealed[:32], sealed[32:]
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        return _cipher(shared, ephemeral_public, recipient).decrypt(_NONCE, box, None).decode("utf-8")
    except (InvalidTag, ValueError):
        return None


def new_user_code() -> str:
    return "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))


def shown(user_code: str) -> str:
    """A user code as people see it: ``XXXX-XXXX``."""
    return f"{user_code[:4]}-{user_code[4:]}"


def read_user_code(value: object) -> str | None:
    """A user code as typed (any case, with or without the dash, spaces around), in the
    stored form; None if it cannot be one (counted as a wrong code)."""
    if not isinstance(value, str) or len(value) > MAX_USER_CODE_LENGTH:
        return None
    code = value.strip().upper()
    if len(code) == USER_CODE_LENGTH + 1 and code[4] == "-":
        code = code[:4] + code[5:]
    if len(code) != USER_CODE_LENGTH or any(char not in USER_CODE_ALPHABET for char in code):
        return None
    return code


def _display_name(body: JsonDict) -> str | None:
    name = body.get("initial_device_display_name")
    if name is None:
        return None
    if not isinstance(name, str):
        raise MatrixError(400, Codes.BAD_JSON, "'initial_device_display_name' must be a string")
    if len(name) > MAX_DISPLAY_NAME_LENGTH or not name.isprintable():
        raise MatrixError(
            400,
            Codes.INVALID_PARAM,
            f"'initial_device_display_name' must be at most {MAX_DISPLAY_NAME_LENGTH} printable characters",
        )
    return name.strip() or None


def _not_found() -> MatrixError:
    return MatrixError(404, Codes.NOT_FOUND, "No pending pairing has this code")


class Pairings:
    """The pairing job: what each endpoint does (``resources.py`` reads the requests)."""

    def __init__(
        self,
        *,
        config: PairingConfig,
        store: PairingStore,
        issuing: Issuing,
        uia: UiaFlow,
        require_ui_auth: bool,
        server_name: str,
        revocation: Revocation,
        start_limiter: RateLimitStore,
        poll_limiter: RateLimitStore,
        wrong_codes: RateLimitStore,
        public_baseurl: Callable[[], str],
        metrics: Metrics,
        now: Callable[[], float],
    ) -> None:
        self._config = config
        self._store = store
        self._issuing = issuing
        self._uia = uia
        self._require_ui_auth = require_ui_auth
        self._server_name = server_name
        self._revocation = revocation
        self._start_limiter = start_limiter
        self._poll_limiter = poll_limiter
        self._wrong_codes = wrong_codes
        self._public_baseurl = public_baseurl
        self._metrics = metrics
        self._now = now

    def _now_ms(self) -> int:
        return int(self._now() * 1000)

    # -- the new device ------------------------------------------------------------

    async def start(self, body: JsonDict, address: str | None) -> JsonDict:
        display_name = _display_name(body)
        retry_after = await self._start_limiter.acquire(address or "", self._now())
        if retry_after is not None:
            self._metrics.ratelimited.labels("pair_start").inc()
            raise rate_limited(retry_after)
        now_ms = self._now_ms()
        pairing_id = secrets.token_urlsafe(PAIRING_ID_BYTES)
        for _ in range(8):
            pairing = Pairing(
                pairing_hash=pairing_hash(pairing_id),
                user_code=new_user_code(),
                seal_key=seal_key(pairing_id),
                display_name=display_name,
                client_address=address,
                created_at_ms=now_ms,
                expires_at_ms=now_ms + self._config.lifetime_ms,
            )
            outcome = await self._store.start(pairing, now_ms, MAX_PENDING_PER_ADDRESS)
            if outcome == "started":
                break
            if outcome == "address_full":
                self._metrics.ratelimited.labels("pair_pending").inc()
                raise rate_limited(
                    self._config.interval_ms, "Too many pairings are waiting for approval from this address"
                )
        else:
            # Eight live codes drawn in a row: the code space is nearly full.
            raise MatrixError(503, Codes.UNKNOWN, "No pairing code is free; try again later")
        self._metrics.pairings.labels("started").inc()
        audit.record(
            "pair_start",
            "started",
            client_address=address,
            pairing=audit.fingerprint_of_hash(pairing.pairing_hash),
        )
        page = self._public_baseurl() + PAGE_PATH.lstrip("/")
        return {
            "pairing_id": pairing_id,
            "user_code": shown(pairing.user_code),
            "verification_uri": page,
            "verification_uri_complete": f"{page}?code={quote(shown(pairing.user_code))}",
            "expires_in_ms": self._config.lifetime_ms,
            "interval_ms": self._config.interval_ms,
        }

    async def poll(self, body: JsonDict, address: str | None) -> JsonDict:
        pairing_id = body.get("pairing_id")
        if not isinstance(pairing_id, str):
            raise MatrixError(400, Codes.BAD_JSON, "'pairing_id' must be a string")
        if not 0 < len(pairing_id) <= MAX_PAIRING_ID_LENGTH:
            raise MatrixError(404, Codes.NOT_FOUND, "No such pairing")
        now = self._now()
        key = pairing_hash(pairing_id)
        # Delivery first: of racing polls of a decided pairing, one gets it.
        pairing = await self._store.poll(key, int(now * 1000))
        if pairing is None:
            raise MatrixError(404, Codes.NOT_FOUND, "No such pairing")
        if pairing.status == "pending":
            # RFC 8628's slow_down: a new device polls no faster than the interval.
            retry_after = await self._poll_limiter.acquire(key.hex(), now)
            if retry_after is not None:
                self._metrics.ratelimited.labels("pair_poll").inc()
                raise rate_limited(retry_after, "Poll no faster than interval_ms")
            return {"status": "pending"}
        common = {
            "user_id": pairing.user_id,
            "minted_by_device": pairing.device_id,
            "client_address": address,
            "approver_address": pairing.approver_address,
            "pairing": audit.fingerprint_of_hash(pairing.pairing_hash),
        }
        if pairing.status == "denied":
            audit.record("pair_deliver", "denied", **common)
            return {"status": "denied"}
        token = None if pairing.sealed_token is None else unseal(pairing_id, pairing.sealed_token)
        if token is None or pairing.token_expires_at_ms is None or pairing.user_id is None:
            # Cannot happen unless the row was tampered with: nothing to deliver.
            logger.warning("A pairing's sealed token could not be opened; nothing delivered")
            raise MatrixError(404, Codes.NOT_FOUND, "No such pairing")
        self._metrics.pairings.labels("delivered").inc()
        audit.record("pair_deliver", "delivered", token_fingerprint=audit.fingerprint(token), **common)
        return {
            "status": "approved",
            "login_token": token,
            "expires_in_ms": max(1, pairing.token_expires_at_ms - int(now * 1000)),
            "user_id": pairing.user_id,
        }

    # -- the signed-in device --------------------------------------------------------

    async def _pending(self, user_id: str | None, raw_code: object, address: str | None) -> Pairing:
        """The live pending pairing a user (or, on the page before sign-in, anyone) names,
        or 404; a wrong code counts against the user and the address (429 once either
        is over the limit)."""
        now = self._now()
        keys = ((f"user:{user_id}",) if user_id is not None else ()) + (f"address:{address or ''}",)
        # Admit, then look: a wrong code is reserved against every key before the code is
        # looked up (so racing guesses cannot all slip under the limit), and given back
        # when the code is right.
        reserved: list[str] = []
        try:
            for key in keys:
                retry_after = await self._wrong_codes.acquire(key, now)
                if retry_after is not None:
                    self._metrics.ratelimited.labels("pair_wrong_code").inc()
                    raise rate_limited(retry_after, "Too many wrong codes; wait before trying another")
                reserved.append(key)
            code = read_user_code(raw_code)
            pairing = None if code is None else await self._store.find(code, int(now * 1000))
        except BaseException:
            await self._give_back_wrong_code(reserved)
            raise
        if pairing is None:
            raise _not_found()
        await self._give_back_wrong_code(reserved)
        return pairing

    async def _give_back_wrong_code(self, keys: list[str]) -> None:
        """Take back reserved wrong-code allowances (the code was right, or not looked at)."""
        for key in keys:
            try:
                await self._wrong_codes.refund(key, self._now())
            except Exception as error:
                logger.warning("Could not give back a wrong-code allowance: %s", error)

    async def describe(self, requester: Requester, raw_code: object, address: str | None) -> JsonDict:
        """What asks to be signed in, before any password prompt."""
        pairing = await self._pending(requester.user_id, raw_code, address)
        return {
            "user_code": shown(pairing.user_code),
            "initial_device_display_name": pairing.display_name,
            "client_address": pairing.client_address,
            "created_at_ms": pairing.created_at_ms,
            "expires_in_ms": max(0, pairing.expires_at_ms - self._now_ms()),
        }

    async def approve(
        self,
        requester: Requester,
        body: JsonDict,
        address: str | None,
        still_signed_in: Callable[[], Awaitable[bool]] | None,
    ) -> JsonDict:
        """Approve after UIA (as get_token's): mint a token and hold it sealed for the new device."""
        pairing = await self._pending(requester.user_id, body.get("user_code"), address)
        token, lifetime_ms = await self._issuing.issue_token(
            requester, body, APPROVE_PATH, address, still_signed_in
        )
        return await self._hold_for_delivery(requester, pairing, token, lifetime_ms, address)

    async def _hold_for_delivery(
        self, requester: Requester, pairing: Pairing, token: str, lifetime_ms: int, address: str | None
    ) -> JsonDict:
        """Seal a freshly minted token to the pairing and mark it approved (atomically: if
        it is no longer pending, the token is revoked and the answer is 404)."""
        token_hash = tokens.hash_token(token)
        now_ms = self._now_ms()
        try:
            approved = await self._store.approve(
                pairing.user_code,
                now_ms,
                user_id=requester.user_id,
                device_id=requester.device_id,
                approver_address=address,
                sealed_token=seal(pairing.seal_key, token),
                token_hash=token_hash,
                token_expires_at_ms=now_ms + lifetime_ms,
            )
        except BaseException:
            await self._revocation.revoke_one(requester.user_id, token_hash)
            raise
        if approved is None:
            # Denied, approved elsewhere or expired while the password was checked.
            await self._revocation.revoke_one(requester.user_id, token_hash)
            raise _not_found()
        self._metrics.pairings.labels("approved").inc()
        audit.record(
            "pair_approve",
            "approved",
            user_id=requester.user_id,
            minted_by_device=requester.device_id,
            client_address=address,
            new_device_address=pairing.client_address,
            token_fingerprint=audit.fingerprint(token),
            pairing=audit.fingerprint_of_hash(pairing.pairing_hash),
        )
        return {"user_code": shown(pairing.user_code), "initial_device_display_name": pairing.display_name}

    async def deny(self, requester: Requester, body: JsonDict, address: str | None) -> JsonDict:
        pairing = await self._pending(requester.user_id, body.get("user_code"), address)
        return await self._deny(requester, pairing, address)

    async def _deny(self, requester: Requester, pairing: Pairing, address: str | None) -> JsonDict:
        denied = await self._store.deny(
            pairing.user_code,
            self._now_ms(),
            user_id=requester.user_id,
            device_id=requester.device_id,
            approver_address=address,
        )
        if denied is None:
            raise _not_found()
        self._metrics.pairings.labels("denied").inc()
        audit.record(
            "pair_deny",
            "denied",
            user_id=requester.user_id,
            minted_by_device=requester.device_id,
            client_address=address,
            new_device_address=pairing.client_address,
            pairing=audit.fingerprint_of_hash(pairing.pairing_hash),
        )
        return {}

    # -- the approval page (a phone's browser: no access token, the password instead) --

    async def look_up(self, raw_code: object, address: str | None) -> Pairing:
        """The pending pairing a code on the page names (before sign-in: wrong codes count
        against the address), or 404."""
        return await self._pending(None, raw_code, address)

    def page_user(self, typed: str) -> str | None:
        """The local user id a person typed on the page (``alice`` or ``@alice:server``)."""
        name = typed.strip()
        if name.startswith("@"):
            localpart, _, domain = name[1:].partition(":")
            if domain != self._server_name:
                return None
        else:
            localpart = name
        if not localpart or len(localpart) > 255 or not localpart.isprintable() or ":" in localpart:
            return None
        return f"@{localpart.lower()}:{self._server_name}"

    async def decide_in_page(
        self, user_id: str, password: str, raw_code: object, approve: bool, address: str | None
    ) -> JsonDict:
        """Approve or deny from the page: the password is checked as UIA checks it (the
        failed-password limit), and approving mints under get_token's allowance."""
        requester = Requester(user_id=user_id, device_id=None)
        pairing = await self._pending(user_id, raw_code, address)
        if not approve:
            await self._uia.check_password(requester, PAGE_PATH, None, password)
            return await self._deny(requester, pairing, address)
        body: JsonDict = {}
        if self._require_ui_auth:
            # A one-shot password stage (no session): checked once, by issuing.
            body = {"auth": {"type": PASSWORD_STAGE, "password": password}}
        else:
            await self._uia.check_password(requester, PAGE_PATH, None, password)
        token, lifetime_ms = await self._issuing.issue_token(requester, body, PAGE_PATH, address)
        return await self._hold_for_delivery(requester, pairing, token, lifetime_ms, address)

    # -- housekeeping ----------------------------------------------------------------

    async def sweep(self) -> None:
        """Forget expired pairings (counted as expiries) and drained pairing limits."""
        now = self._now()
        try:
            expired = await self._store.sweep(int(now * 1000))
            if expired:
                self._metrics.pairings.labels("expired").inc(expired)
            for limiter in (self._start_limiter, self._poll_limiter, self._wrong_codes):
                await limiter.sweep(now)
        except Exception as error:
            logger.warning("Could not sweep the pairings: %s", error)

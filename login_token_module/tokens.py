"""Login tokens: minting, recognising and hashing.

A token reads ``mlt_<43 base62 chars>_<6 base62 chars>``: a prefix that says
what it is (secret scanners and people can spot a leaked one), 256 random bits,
and a CRC-32 of everything before it, so typos and truncated pastes are turned
away without touching the store. Only the SHA-256 of a token is ever stored;
256 random bits need no salt or slow hash.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib

PREFIX = "mlt_"
_ALPHABET = string.digits + string.ascii_letters
_INDEX = {char: i for i, char in enumerate(_ALPHABET)}
_RANDOM_BYTES = 32
_BODY_LEN = 43  # 62**43 > 2**256
_CHECKSUM_LEN = 6  # 62**6 > 2**32
TOKEN_LENGTH = len(PREFIX) + _BODY_LEN + 1 + _CHECKSUM_LEN


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


def _checksum(text: str) -> str:
    return _base62(zlib.crc32(text.encode("ascii")), _CHECKSUM_LEN)


def generate_token() -> str:
    body = PREFIX + _base62(int.from_bytes(secrets.token_bytes(_RANDOM_BYTES), "big"), _BODY_LEN)
    return f"{body}_{_checksum(body)}"


def is_well_formed(token: str) -> bool:
    """Whether ``token`` has our shape and a matching checksum (not whether it is live)."""
    if len(token) != TOKEN_LENGTH or not token.startswith(PREFIX):
        return False
    body, sep, checksum = token.rpartition("_")
    if sep != "_" or len(checksum) != _CHECKSUM_LEN:
        return False
    # Every character base62, the checksum's too: compare_digest takes ASCII text only.
    if any(char not in _INDEX for char in body[len(PREFIX) :]) or any(
        char not in _INDEX for char in checksum
    ):
        return False
    return secrets.compare_digest(checksum, _checksum(body))


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()

"""API keys: how they look, and how they are checked without being stored.

A key is `lgt_<key id>_<secret>`: the key id (12 hex digits, not secret) finds
the agent, and the SHA-256 of the whole key, compared in constant time,
proves it. Only the key id and the hash are stored; the key itself is shown
once, when it is issued.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "lgt_"
_KEY_RE = re.compile(r"lgt_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


def issue() -> tuple[str, str, str]:
    """A new key: (key, key_id, key_hash). 32 random bytes of secret."""
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    return key, key_id, digest(key)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    match = _KEY_RE.fullmatch(key)
    return match.group(1) if match else None


def matches(key: str, key_hash: str) -> bool:
    return hmac.compare_digest(digest(key), key_hash)

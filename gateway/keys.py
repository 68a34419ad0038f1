"""Tenant API keys: random, prefixed, stored only as a SHA-256 hash.

A fast hash is the right one here: keys carry 256 random bits, so nothing can be guessed from a
leaked hash, and a slow password hash would cost milliseconds on every request. Keys are looked
up by their hash, so timing tells nothing about stored keys; hashes are compared with
``hmac.compare_digest``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "lp-"


def new_key() -> str:
    """A fresh key: ``lp-`` and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    """A public id for a key (shown in listings, used to revoke it)."""
    return secrets.token_hex(6)


def hash_key(key: str) -> str:
    """The stored form of a key: hex SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    """Compare two hashes in constant time."""
    return hmac.compare_digest(a.encode(), b.encode())


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None

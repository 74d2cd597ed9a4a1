"""API keys for the gateway: created once, shown once, stored as a SHA-256 digest.

A key looks like ``wl-<id>.<secret>``; the id is public (listing, disabling), the secret is 256
random bits. Digests of such high-entropy secrets need no slow KDF.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update

from services.store.models import ApiKey
from services.store.repository import Store

SCOPES = frozenset({"chat", "admin"})


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: str
    tenant_id: str
    name: str
    scopes: frozenset[str]
    disabled: bool
    created_at: datetime


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(
        row.id, row.tenant_id, row.name, frozenset(row.scopes), row.disabled, row.created_at
    )


def create_key(
    store: Store, *, tenant_id: str, name: str = "", scopes: frozenset[str] = frozenset({"chat"})
) -> tuple[str, KeyInfo]:
    """Create a key; returns the secret key (shown once) and its record."""
    unknown = scopes - SCOPES
    if unknown:
        raise ValueError(f"unknown scope(s) {sorted(unknown)}; known: {sorted(SCOPES)}")
    if not tenant_id.strip():
        raise ValueError("tenant id must not be empty")
    key_id = "k" + secrets.token_hex(6)
    key = f"wl-{key_id}.{secrets.token_urlsafe(32)}"
    row = ApiKey(
        id=key_id,
        digest=digest(key),
        tenant_id=tenant_id,
        name=name,
        scopes=sorted(scopes),
        disabled=False,
    )
    with store.transaction() as session:
        session.add(row)
        session.flush()
        return key, _info(row)


def verify_key(store: Store, key: str) -> KeyInfo | None:
    """The key's record if the key exists and is enabled, else None."""
    with store.transaction() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.digest == digest(key)))
        return None if row is None or row.disabled else _info(row)


def list_keys(store: Store, *, tenant_id: str | None = None) -> list[KeyInfo]:
    stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    with store.transaction() as session:
        return [_info(r) for r in session.scalars(stmt)]


def disable_key(store: Store, key_id: str) -> bool:
    """Disable a key by id; False if there is no such key."""
    with store.transaction() as session:
        result = session.execute(update(ApiKey).where(ApiKey.id == key_id).values(disabled=True))
        return bool(result.rowcount)  # type: ignore[attr-defined]

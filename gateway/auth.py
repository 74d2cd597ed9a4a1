"""API-key authentication with a short in-process cache (no store round trip per request)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from gateway.errors import unauthorized
from services.store.keys import KeyInfo, verify_key
from services.store.repository import Store

# With authentication off (local use), every caller acts as this key.
ANONYMOUS = KeyInfo(
    "anonymous",
    "default",
    "anonymous",
    frozenset({"chat", "admin"}),
    False,
    datetime(1970, 1, 1, tzinfo=UTC),
)


class KeyVerifier:
    """Resolves ``Authorization: Bearer <key>`` to the key's record.

    Results (hits and misses) are cached for ``ttl_s`` seconds: a disabled key stops working
    within that time on every gateway replica.
    """

    def __init__(
        self, store: Store, *, required: bool, ttl_s: float = 30.0, max_entries: int = 10_000
    ) -> None:
        self.store = store
        self.required = required
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, KeyInfo | None]] = {}

    async def authenticate(self, authorization: str | None) -> KeyInfo:
        if not self.required:
            return ANONYMOUS
        if not authorization:
            raise unauthorized(
                "You didn't provide an API key. Send 'Authorization: Bearer <key>' "
                "(create one with `wildloop keys create`)."
            )
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise unauthorized("Malformed Authorization header; expected 'Bearer <key>'.")
        info = await self._lookup(key.strip())
        if info is None:
            raise unauthorized("Incorrect or disabled API key provided.")
        return info

    async def _lookup(self, key: str) -> KeyInfo | None:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        info = await asyncio.to_thread(verify_key, self.store, key)
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[key] = (now + self.ttl_s, info)
        return info

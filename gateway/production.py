"""Which adapter the model alias (``wildloop``) serves: the store's production adapter."""

from __future__ import annotations

import logging
import threading
import time

from services.store.repository import Store

log = logging.getLogger(__name__)


class ProductionAdapter:
    """Callable returning the production adapter id (or None = base model), re-read from the
    store at most every ``refresh_s`` seconds; a store outage keeps the last known answer."""

    def __init__(self, store: Store, *, refresh_s: float) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._value: str | None = None
        self._next = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        now = time.monotonic()
        if now >= self._next and self._lock.acquire(blocking=False):
            try:
                self._value = self._read()
            except Exception as exc:
                log.warning("cannot read the production adapter", extra={"error": str(exc)})
            finally:
                self._next = now + self.refresh_s
                self._lock.release()
        return self._value

    def _read(self) -> str | None:
        adapter = self.store.production_adapter()
        return None if adapter is None else adapter.id

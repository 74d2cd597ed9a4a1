"""API keys: created once and shown once, stored as digests, scoped, disable-able."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from services.store import keys
from services.store.models import ApiKey
from services.store.repository import Store
from tests.cli_helpers import run


def test_a_key_verifies_until_disabled_and_only_its_digest_is_stored(store: Store) -> None:
    secret, info = keys.create_key(
        store, tenant_id="acme", name="ci", scopes=frozenset({"chat", "admin"})
    )
    assert secret.startswith(f"wl-{info.id}.")
    verified = keys.verify_key(store, secret)
    assert verified is not None and verified.tenant_id == "acme"
    assert verified.scopes == {"chat", "admin"}
    with store.transaction() as s:
        stored = s.scalars(select(ApiKey)).one()
    assert secret not in (stored.digest, stored.id, stored.name)
    assert keys.verify_key(store, secret + "x") is None
    assert keys.disable_key(store, info.id)
    assert keys.verify_key(store, secret) is None
    assert not keys.disable_key(store, "k-missing")


def test_unknown_scopes_and_empty_tenants_are_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="unknown scope"):
        keys.create_key(store, tenant_id="acme", scopes=frozenset({"root"}))
    with pytest.raises(ValueError, match="tenant"):
        keys.create_key(store, tenant_id=" ")


def test_the_keys_cli_creates_lists_and_disables(tmp_path: Path) -> None:
    created = run(tmp_path, "keys", "create", "--tenant", "acme", "--name", "ops", "--admin")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    key_id = secret.removeprefix("wl-").split(".")[0]
    listed = run(tmp_path, "keys", "list")
    assert key_id in listed.stdout and "admin,chat" in listed.stdout
    assert secret not in listed.stdout
    assert run(tmp_path, "keys", "disable", key_id).returncode == 0
    assert "disabled" in run(tmp_path, "keys", "list").stdout
    assert run(tmp_path, "keys", "disable", "k-missing").returncode == 1

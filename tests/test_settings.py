"""One settings object; embedded by default, production chosen by environment alone."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.settings import BusBackend, WildloopSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("WILDLOOP_"):
            monkeypatch.delenv(key)


def test_with_nothing_set_everything_is_embedded_under_the_data_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    s = WildloopSettings()
    assert s.mode == "embedded" and s.bus_backend is BusBackend.EMBEDDED
    assert s.data_dir == tmp_path / "wildloop"
    assert s.store_url == f"sqlite:///{tmp_path / 'wildloop' / 'wildloop.db'}"
    assert s.event_log_path == tmp_path / "wildloop" / "events.db"
    assert s.topics.chat_turns == "chat.turns" and s.topics.dead_letter == "wildloop.dead-letter"


def test_production_is_selected_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WILDLOOP_KAFKA_BOOTSTRAP", "k1:9092, k2:9092")
    monkeypatch.setenv("WILDLOOP_DATABASE_URL", "postgresql://u:p@db/wildloop")
    monkeypatch.setenv("WILDLOOP_VLLM_URL", "http://vllm:8000/v1")
    monkeypatch.setenv("WILDLOOP_TOPICS__CHAT_TURNS", "prod.chat.turns")
    monkeypatch.setenv("WILDLOOP_KAFKA__REPLICATION_FACTOR", "3")
    s = WildloopSettings()
    assert s.mode == "production" and s.bus_backend is BusBackend.KAFKA
    assert s.kafka_servers == ["k1:9092", "k2:9092"]
    assert s.store_url == "postgresql+psycopg://u:p@db/wildloop"
    assert s.topics.chat_turns == "prod.chat.turns"
    assert s.kafka.replication_factor == 3


def test_blank_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WILDLOOP_KAFKA_BOOTSTRAP", " ")
    assert WildloopSettings().bus_backend is BusBackend.EMBEDDED


def test_invalid_values_are_refused_with_the_field_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WILDLOOP_KAFKA__PARTITIONS", "0")
    with pytest.raises(ValidationError, match="partitions"):
        WildloopSettings()

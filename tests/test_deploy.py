"""Static checks of deploy/ (no Docker engine runs here): the files parse and configure wildloop
only through settings that exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from services.settings import WildloopSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def setting_exists(variable: str) -> bool:
    path = variable.removeprefix("WILDLOOP_").lower().split("__")
    model: type[BaseModel] = WildloopSettings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(path) - 1:
            inner = field.annotation
            if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
                return False
            model = inner
    return True


def test_every_wildloop_variable_in_compose_is_a_real_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = 0
    for service in compose()["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if name.startswith("WILDLOOP_"):
                assert setting_exists(name), f"{name} is not a wildloop setting"
                monkeypatch.setenv(name, str(value))
                seen += 1
    assert seen
    settings = WildloopSettings()  # and the values validate together
    assert settings.mode == "production"


def test_compose_services_use_commands_the_cli_has() -> None:
    recorder = compose()["services"]["recorder"]
    assert recorder["command"] == ["serve", "recorder"]
    assert recorder["build"]["dockerfile"] == "deploy/Dockerfile"
    assert 'ENTRYPOINT ["wildloop"]' in (DEPLOY / "Dockerfile").read_text()

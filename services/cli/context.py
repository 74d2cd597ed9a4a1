"""What every CLI command receives: the settings, and factories for what it may open."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import typer
from rich.console import Console

from services.bus.factory import build_bus
from services.bus.ports import EventBus
from services.settings import WildloopSettings
from services.store.repository import Store

out = Console()
err = Console(stderr=True)


@dataclass
class CliContext:
    settings: WildloopSettings

    def open_store(self) -> Store:
        try:
            return Store.open(self.settings.store_url)
        except Exception as exc:
            fail(f"cannot open the store at {self.settings.store_url}: {exc}", code=1)

    def open_bus(self) -> EventBus:
        try:
            return build_bus(self.settings)
        except Exception as exc:
            fail(f"cannot open the event bus: {exc}", code=1)


def fail(message: str, *, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def context(ctx: typer.Context) -> CliContext:
    obj = ctx.find_object(CliContext)
    assert obj is not None, "the root callback sets the CLI context"
    return obj

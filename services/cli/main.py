"""``wildloop``: the command line of every wildloop role."""

from __future__ import annotations

import typer
from pydantic import ValidationError

from services.cli import bus, conversations, db, demo, detect, doctor, keys, serve
from services.cli.context import CliContext, err
from services.logs import configure_logging
from services.settings import WildloopSettings

app = typer.Typer(
    name="wildloop",
    help="Online feedback learning for LLM chat. Settings come from WILDLOOP_* environment "
    "variables; with none set, everything runs embedded under ~/.local/share/wildloop.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(conversations.app, name="conversations")
app.add_typer(serve.app, name="serve")
app.add_typer(db.app, name="db")
app.add_typer(bus.app, name="bus")
app.add_typer(keys.app, name="keys")
serve.register_plugins()
serve.register_command_groups(app)
app.command("doctor")(doctor.doctor)
app.command("demo")(demo.demo)
app.command("detect")(detect.detect)


@app.callback()
def _root(ctx: typer.Context) -> None:
    try:
        settings = WildloopSettings()
    except ValidationError as exc:
        problems = "; ".join(
            f"WILDLOOP_{'__'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        err.print(f"[bold red]error:[/] invalid settings: {problems}", highlight=False)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    ctx.obj = CliContext(settings=settings)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""``wildloop detect``: label conversations offline (FORMATS.md), no server or broker needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from services.cli.context import context, err, fail


def detect(
    ctx: typer.Context,
    input_: Annotated[Path, typer.Option("--input", "-i", help="Conversations JSON Lines.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Turn labels JSON Lines.")],
    tiers: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated cascade, cheapest first, from rules,classifier,encoder,llm. "
            "Default: WILDLOOP_DETECTOR__TIERS (rules,classifier,encoder)."
        ),
    ] = None,
) -> None:
    """Label every user turn that follows an assistant answer as SAT/DSAT/MIXED/NEUTRAL.

    The rules, classifier and encoder tiers run offline; the llm tier calls
    WILDLOOP_DETECTOR__LLM_URL. A malformed input line is reported with its number and skipped
    (exit code 3); the output file is written whole or not at all.
    """
    from services.detector.batch import detect_file  # noqa: PLC0415 - keeps the CLI start fast
    from services.detector.factory import DetectorConfigError, build_cascade  # noqa: PLC0415

    cfg = context(ctx).settings.detector
    if not input_.is_file():
        fail(f"no such file: {input_}", code=2)
    names = [t.strip() for t in tiers.split(",") if t.strip()] if tiers is not None else None
    if names is not None and not names:
        fail("--tiers names no tier", code=2)
    try:
        cascade = build_cascade(cfg, names)
    except DetectorConfigError as exc:
        fail(str(exc), code=2)
    size = input_.stat().st_size
    with Progress(
        TextColumn("[bold]detect"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("detect", total=size)
        try:
            report = detect_file(
                input_,
                output,
                cascade,
                history_messages=cfg.history_messages,
                batch_size=cfg.batch_size,
                progress=lambda done: bar.update(task, completed=done),
            )
        except OSError as exc:
            fail(f"cannot write {output}: {exc}", code=1)
    for problem in report.errors:
        err.print(f"{input_}:{problem.line}: skipped: {problem.message}", highlight=False)
    polarity = ", ".join(f"{k} {v}" for k, v in sorted(report.by_polarity.items())) or "none"
    by_tier = ", ".join(f"{k} {v}" for k, v in sorted(report.by_tier.items())) or "none"
    err.print(
        f"labelled {report.labels} turn(s) of {report.conversations} conversation(s) "
        f"with detector {cascade.version} ({polarity}; decided by {by_tier})",
        highlight=False,
    )
    if report.errors:
        raise typer.Exit(3)

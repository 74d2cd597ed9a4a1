"""``wildloop learn build|train|run`` and ``wildloop serve learner`` (plugged into the core CLI
through the ``wildloop.commands`` and ``wildloop.serve`` entry points)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from learner.training import StepReport
from services.cli.context import context, err, fail, out
from services.metrics import Metrics
from services.models import ModelUnavailableError, ensure_base_model
from services.settings import WildloopSettings

if TYPE_CHECKING:
    from learner.service import LearnerService

# The learner's modules (and through them openai, torch, TRL) are imported inside the commands,
# so that `wildloop` starts fast and works without the `train` extra for everything else.

app = typer.Typer(help="Preference data and LoRA DPO/KTO training.", no_args_is_help=True)
log = logging.getLogger("wildloop.learn")

MethodOption = Annotated[
    Literal["dpo", "kto"] | None,
    typer.Option(help="dpo (pairs) or kto (unpaired); default WILDLOOP_LEARNER__METHOD."),
]
MaxStepsOption = Annotated[
    int | None, typer.Option(min=1, help="Stop after this many optimizer steps.")
]


def _base_model(settings: WildloopSettings) -> Path:
    try:
        return ensure_base_model(settings)
    except ModelUnavailableError as exc:
        fail(str(exc), code=1)


class _Bar:
    """A rich progress bar fed by the trainer's step reports; it appears with the first report
    (step 0 = the model is loading), so a cycle with nothing to train prints no bar."""

    def __init__(self, label: str) -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=err,
        )
        self.task = self.progress.add_task(label, total=None, status="loading model")
        self.started = False

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()

    def __call__(self, report: StepReport) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if report.step == 0:
            return
        status = []
        if report.loss is not None:
            status.append(f"loss {report.loss:.4f}")
        if report.reward_margin is not None:
            status.append(f"margin {report.reward_margin:+.4f}")
        if report.tokens_per_s is not None:
            status.append(f"{report.tokens_per_s:,.0f} tok/s")
        self.progress.update(
            self.task, completed=report.step, total=report.max_steps, status="  ".join(status)
        )


@app.command("build")
def build(
    ctx: typer.Context,
    output: Annotated[Path, typer.Option(help="Dataset folder to write.")],
    conversations: Annotated[
        Path | None, typer.Option(help="Conversations JSON Lines (FORMATS.md).")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Turn labels JSON Lines (FORMATS.md).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset folder.")] = False,
) -> None:
    """Build a preference dataset (DPO pairs and KTO examples, with a manifest) from files, or,
    without --conversations/--labels, from every labelled conversation in the store.

    A malformed input line is reported with its file and line number and skipped (exit code 3);
    the dataset folder is written whole or not at all."""
    from learner.batch import assemble  # noqa: PLC0415
    from learner.builder import Builder  # noqa: PLC0415
    from learner.corpus import FileCorpus, from_files, from_store  # noqa: PLC0415
    from learner.dataset import DatasetError, write_dataset  # noqa: PLC0415
    from learner.factory import LearnerConfigError, build_regenerator  # noqa: PLC0415

    cli = context(ctx)
    settings = cli.settings
    version = settings.learner.detector_version
    if (conversations is None) != (labels is None):
        fail("give both --conversations and --labels, or neither (build from the store)", code=2)
    if conversations is not None and labels is not None:
        for path in (conversations, labels):
            if not path.is_file():
                fail(f"no such file: {path}", code=2)
        corpus = from_files(conversations, labels, detector_version=version)
        origin = f"files:{conversations.name}+{labels.name}"
    else:
        from services.store.learning import LearningStore  # noqa: PLC0415

        store = cli.open_store()
        try:
            rows = list(LearningStore(store).conversations())
        finally:
            store.close()
        corpus = FileCorpus(list(from_store(rows, detector_version=version)), [], 0)
        origin = "store"
    try:
        regenerator = build_regenerator(
            settings,
            base_model_dir=None
            if settings.learner.generator == "expert"
            else _lazy_model(settings),
        )
    except LearnerConfigError as exc:
        fail(str(exc), code=2)
    built = Builder(settings.learner, regenerator=regenerator).build(corpus.conversations)
    batch = assemble(built.pairs, built.unpaired, settings.learner, built.drops)
    try:
        manifest = write_dataset(
            output,
            batch,
            origin=origin,
            settings=settings.learner.model_dump(
                exclude={"generator_api_key", "judge_api_key"}, mode="json"
            ),
            overwrite=overwrite,
        )
    except DatasetError as exc:
        fail(str(exc), code=2)
    except OSError as exc:
        fail(f"cannot write {output}: {exc}", code=1)
    for name, problem in corpus.errors:
        err.print(f"{name}:{problem.line}: skipped: {problem.message}", highlight=False)
    table = Table(title=f"dataset {output}", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("conversations", str(len(corpus.conversations)))
    table.add_row("DPO pairs", str(manifest.pairs))
    for strategy, n in sorted(manifest.strategies.items()):
        table.add_row(f"  {strategy}", str(n))
    table.add_row("KTO desirable / undesirable", f"{manifest.desirable} / {manifest.undesirable}")
    for reason, n in sorted(manifest.drops.items()):
        table.add_row(f"dropped: {reason}", str(n))
    if built.pending:
        table.add_row(
            "conversations waiting for a complaint's outcome (SETTLE_MINUTES)",
            str(len(built.pending)),
        )
    if corpus.unmatched_labels:
        table.add_row("labels without their turn", str(corpus.unmatched_labels))
    err.print(table)
    out.print(manifest.content_hash, highlight=False)
    if corpus.errors:
        raise typer.Exit(3)


def _lazy_model(settings: WildloopSettings) -> Path | None:
    """The base model folder, only when regeneration will need it in process."""
    learner = settings.learner
    if learner.strategy == "natural" or not learner.judge_url or settings.vllm_url:
        return None
    return _base_model(settings)


@app.command("train")
def train(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="Dataset folder (wildloop learn build).")],
    output: Annotated[Path, typer.Option(help="Adapter folder to create.")],
    method: MethodOption = None,
    max_steps: MaxStepsOption = None,
) -> None:
    """Train a LoRA adapter with DPO or KTO (TRL + PEFT) on the base model.

    Writes a PEFT adapter folder (loadable by PEFT and vLLM) with wildloop-adapter.json, or
    nothing: a NaN/inf or runaway loss aborts the run (exit code 1)."""
    from learner.training import TrainingError, train_adapter  # noqa: PLC0415

    settings = context(ctx).settings
    chosen = method or settings.learner.method
    if not data.is_dir():
        fail(f"no such dataset folder: {data}", code=2)
    if output.exists() and any(output.iterdir()):
        fail(f"{output} exists and is not empty", code=2)
    base = _base_model(settings)
    with _Bar(f"{chosen} training") as bar:
        bar(StepReport(step=0, max_steps=0, loss=None, reward_margin=None, tokens_per_s=None))
        try:
            manifest = train_adapter(
                data,
                output,
                settings=settings.learner,
                base_model_dir=base,
                base_model_name=settings.base_model,
                method=chosen,
                run_id=f"cli-{uuid.uuid4().hex[:8]}",
                max_steps=max_steps,
                on_step=bar,
            )
        except TrainingError as exc:
            fail(str(exc), code=1)
    m = manifest.metrics
    err.print(
        f"trained {output} ({chosen}, {m['steps']} steps, {m['examples']} examples, "
        f"final loss {m['final_loss']:.4f}, {m['seconds']:.1f} s on {manifest.device})",
        highlight=False,
    )


def _service(
    settings: WildloopSettings, metrics: Metrics, with_bus: bool
) -> tuple[LearnerService, list[Callable[[], None]]]:
    from learner.factory import LearnerConfigError, build_regenerator  # noqa: PLC0415
    from learner.metrics import LearnerMetrics  # noqa: PLC0415
    from learner.service import LearnerService  # noqa: PLC0415
    from services.bus.factory import build_bus  # noqa: PLC0415
    from services.bus.typed import EventPublisher  # noqa: PLC0415
    from services.store.learning import LearningStore  # noqa: PLC0415
    from services.store.repository import Store  # noqa: PLC0415

    try:
        store = Store.open(settings.store_url)
    except Exception as exc:
        fail(f"cannot open the store at {settings.store_url}: {exc}", code=1)
    closers: list[Callable[[], None]] = [store.close]
    publisher = None
    if with_bus:
        try:
            bus = build_bus(settings)
        except Exception as exc:
            store.close()
            fail(f"cannot open the event bus: {exc}", code=1)
        try:
            bus.ensure_topics([settings.topics.adapter_events])
        except Exception as exc:  # the broker may be down now; publishing retries later
            log.warning("cannot ensure the adapter events topic", extra={"error": str(exc)})
        publisher = EventPublisher(bus.publisher(), settings.topics)
        closers = [publisher.close, bus.close, *closers]
    learning = LearningStore(store)
    try:
        regenerator = build_regenerator(
            settings, base_model_dir=_lazy_model(settings), store=learning
        )
    except LearnerConfigError as exc:
        for close in closers:
            close()
        fail(str(exc), code=2)
    service = LearnerService(
        settings,
        learning,
        base_model_dir=lambda: _base_model(settings),
        metrics=LearnerMetrics(metrics),
        publisher=publisher,
        regenerator=regenerator,
    )
    return service, closers


@app.command("run")
def run(
    ctx: typer.Context,
    max_steps: MaxStepsOption = None,
    force: Annotated[
        bool, typer.Option(help="Train on whatever is usable now, even below the thresholds.")
    ] = False,
) -> None:
    """One build + train cycle from the store, on demand: the examples no run has used, capped
    and balanced; the adapter is registered as a candidate. Exit 0 also when nothing was due."""
    settings = context(ctx).settings
    service, closers = _service(settings, Metrics("learner"), with_bus=True)
    try:
        with _Bar(f"{settings.learner.method} training") as bar:
            outcome = service.run_once(max_steps=max_steps, force=force, on_step=bar)
    finally:
        for close in closers:
            close()
    if outcome.status == "succeeded":
        err.print(
            f"candidate {outcome.adapter_id} registered (run {outcome.run_id}, "
            f"{outcome.examples} examples)",
            highlight=False,
        )
        out.print(outcome.adapter_id, highlight=False)
    elif outcome.status == "failed":
        fail(f"run {outcome.run_id} failed: {outcome.error}", code=1)
    elif outcome.status == "busy":
        fail("another training run holds the lease; try again later", code=4)
    else:
        err.print(
            f"nothing to train: {outcome.examples} usable example(s) "
            f"(needs {settings.learner.min_pairs}, or --force)",
            highlight=False,
        )


def serve_learner(
    ctx: typer.Context,
    metrics_port: Annotated[
        int | None, typer.Option(help="Port of /metrics (default: WILDLOOP_METRICS_PORT).")
    ] = None,
) -> None:
    """Turn new feedback into examples and train a candidate adapter when enough has
    accumulated or the interval has passed; one run at a time across replicas."""
    import signal  # noqa: PLC0415

    settings = context(ctx).settings
    metrics = Metrics("learner")
    service, closers = _service(settings, metrics, with_bus=True)
    port = settings.metrics_port if metrics_port is None else metrics_port
    server = metrics.serve(settings.metrics_host, port)
    stop = threading.Event()

    def _handler(signum: int, _frame: object) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    log.info("learner started", extra={"metrics_port": server.port, "method": service.method})
    try:
        service.serve(stop)
    finally:
        server.close()
        for close in closers:
            close()
    err.print("learner stopped", highlight=False)

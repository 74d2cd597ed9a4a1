"""How well the detector labels turns, per tier and for the cascade (WildFeedback Table 6 style).

On the project's labelled split (default: ``holdout3``, the freshest split no training or tuning
sees; ``--split test+holdout+holdout2`` pools several):

* SAT-present and DSAT-present as binary tasks (gold/predicted polarity in {SAT, MIXED}, resp.
  {DSAT, MIXED}): accuracy, precision, recall, F1 and Cohen's kappa;
* 3-way polarity macro-F1 over SAT / DSAT / NEUTRAL, with MIXED counted as DSAT (a complaint is
  present, which is what the learner acts on);
* recall of every rubric (gold rubric present -> predicted label contains it).

Then the same binary and 3-way scores on the external USS dialogues (``--uss DIR``; ratings
mapped to polarity by the dataset's README: mean <= 2 DSAT, >= 4 SAT, else NEUTRAL) as an
out-of-domain check; nothing is tuned to it. USS is 98% NEUTRAL, so F1 of the rare classes is
the figure to read, not accuracy.

    .venv/bin/python bench/detector_quality.py [--split holdout3] [--tiers rules,classifier,cascade]
        [--uss ../shared/data/uss --uss-per-corpus N] [--llm-url URL --llm-model NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
)

from services.detector.cascade import Cascade
from services.detector.extract import record_contexts
from services.detector.factory import build_cascade
from services.detector.judgement import TurnContext, Verdict
from services.events.schemas import DsatRubric, SatRubric
from services.formats import ConversationRecord, LabelRecord
from services.settings import WildloopSettings

DATA = Path(__file__).resolve().parent.parent / "services" / "detector" / "data"
console = Console(width=170)


@dataclass(frozen=True)
class Gold:
    polarity: str
    sat: frozenset[str]
    dsat: frozenset[str]


SPLITS = ("train", "dev", "test", "holdout", "holdout2", "holdout3")


def split_names(text: str) -> list[str]:
    """``"dev"`` or several splits pooled: ``"test+holdout+holdout2"``."""
    names = text.split("+")
    unknown = [n for n in names if n not in SPLITS]
    if unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: use one of {', '.join(SPLITS)}, or several joined by '+' (no repeats)"
        )
    return names


def load_splits(names: Sequence[str]) -> tuple[list[TurnContext], list[Gold]]:
    """The turns of the named splits, pooled."""
    contexts: list[TurnContext] = []
    gold: list[Gold] = []
    for name in names:
        c, g = load_split(name)
        contexts += c
        gold += g
    return contexts, gold


def load_split(split: str) -> tuple[list[TurnContext], list[Gold]]:
    convs = [
        ConversationRecord.model_validate_json(line)
        for line in (DATA / f"{split}.conversations.jsonl").read_text().splitlines()
        if line.strip()
    ]
    gold = {}
    for line in (DATA / f"{split}.labels.jsonl").read_text().splitlines():
        if line.strip():
            lb = LabelRecord.model_validate_json(line)
            gold[lb.conversation_id, lb.turn] = Gold(
                lb.polarity, frozenset(lb.sat), frozenset(lb.dsat)
            )
    contexts = [c for conv in convs for c in record_contexts(conv)]
    return contexts, [gold[c.conversation_id, c.turn] for c in contexts]


def load_uss(
    folder: Path, per_corpus: int, seed: int
) -> dict[str, tuple[list[TurnContext], list[Gold]]]:
    out = {}
    for file in sorted(folder.glob("*.jsonl")):
        contexts: list[TurnContext] = []
        golds: list[Gold] = []
        for line in file.read_text().splitlines():
            doc = json.loads(line)
            polarity = {lb["turn"]: lb["polarity"] for lb in doc.get("labels", [])}
            record = ConversationRecord.model_validate(doc)
            for ctx in record_contexts(record):
                if ctx.turn in polarity:
                    contexts.append(ctx)
                    golds.append(Gold(polarity[ctx.turn], frozenset(), frozenset()))
        pairs = list(zip(contexts, golds, strict=True))
        random.Random(seed).shuffle(pairs)
        if per_corpus:
            pairs = pairs[:per_corpus]
        out[file.stem] = ([p[0] for p in pairs], [p[1] for p in pairs])
    return out


def sat_present(p: str) -> int:
    return int(p in ("SAT", "MIXED"))


def dsat_present(p: str) -> int:
    return int(p in ("DSAT", "MIXED"))


def three_way(p: str) -> str:
    return "DSAT" if p == "MIXED" else p


def binary_scores(gold: Sequence[int], pred: Sequence[int]) -> dict[str, float]:
    return {
        "acc": accuracy_score(gold, pred),
        "p": precision_score(gold, pred, zero_division=0),
        "r": recall_score(gold, pred, zero_division=0),
        "f1": f1_score(gold, pred, zero_division=0),
        "kappa": cohen_kappa_score(gold, pred) if len(set(gold) | set(pred)) > 1 else 0.0,
    }


@dataclass
class Result:
    name: str
    sat: dict[str, float]
    dsat: dict[str, float]
    macro_f1: float
    rubric_recall: dict[str, tuple[int, int]]
    seconds: float
    turns: int


def score(name: str, gold: Sequence[Gold], verdicts: Sequence[Verdict], seconds: float) -> Result:
    gp = [g.polarity for g in gold]
    pp = [v.polarity.value for v in verdicts]
    recall: dict[str, tuple[int, int]] = {}
    for rubric in [*SatRubric, *DsatRubric]:
        hits = total = 0
        for g, v in zip(gold, verdicts, strict=True):
            if rubric.value in g.sat or rubric.value in g.dsat:
                total += 1
                hits += rubric in v.sat or rubric in v.dsat
        recall[rubric.value] = (hits, total)
    return Result(
        name,
        binary_scores([sat_present(p) for p in gp], [sat_present(p) for p in pp]),
        binary_scores([dsat_present(p) for p in gp], [dsat_present(p) for p in pp]),
        f1_score(
            [three_way(p) for p in gp],
            [three_way(p) for p in pp],
            labels=["SAT", "DSAT", "NEUTRAL"],
            average="macro",
            zero_division=0,
        ),
        recall,
        seconds,
        len(gold),
    )


def run(
    cascade: Cascade, contexts: list[TurnContext], batch: int = 256
) -> tuple[list[Verdict], float]:
    started = time.perf_counter()
    verdicts: list[Verdict] = []
    for i in range(0, len(contexts), batch):
        verdicts += cascade.judge(contexts[i : i + batch])
    return verdicts, time.perf_counter() - started


def table(title: str, results: list[Result]) -> Table:
    t = Table(title=title)
    t.add_column("tier")
    for kind in ("SAT", "DSAT"):
        for col in ("acc", "P", "R", "F1", "κ"):
            t.add_column(f"{kind} {col}", justify="right")
    t.add_column("3-way macro-F1", justify="right")
    t.add_column("turns", justify="right")
    for r in results:
        row = [r.name]
        for s in (r.sat, r.dsat):
            row += [f"{s[k]:.3f}" for k in ("acc", "p", "r", "f1", "kappa")]
        row += [f"{r.macro_f1:.3f}", str(r.turns)]
        t.add_row(*row)
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--split",
        default="holdout3",
        type=split_names,
        help="the split to score, or several pooled: test+holdout+holdout2 (default holdout3)",
    )
    p.add_argument("--tiers", default="rules,classifier,encoder,cascade")
    p.add_argument(
        "--uss", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "uss"
    )
    p.add_argument(
        "--uss-per-corpus", type=int, default=0, help="sample this many turns per corpus (0: all)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sweep",
        action="store_true",
        help="on --split (use dev): cascade scores for a grid of rules thresholds, to choose "
        "WILDLOOP_DETECTOR__RULES_THRESHOLD; never sweep on test",
    )
    p.add_argument(
        "--sweep-classifier",
        action="store_true",
        help="on --split (use dev): cascade scores and the share of turns reaching the encoder "
        "for a grid of classifier thresholds, to choose WILDLOOP_DETECTOR__CLASSIFIER_THRESHOLD",
    )
    p.add_argument("--llm-url")
    p.add_argument("--llm-model")
    args = p.parse_args()
    cfg = WildloopSettings().detector  # WILDLOOP_DETECTOR__* apply
    if args.llm_url:
        cfg = cfg.model_copy(update={"llm_url": args.llm_url, "llm_model": args.llm_model})

    setups: dict[str, Cascade] = {}
    for name in args.tiers.split(","):
        if name == "cascade":
            setups["cascade (" + "+".join(cfg.tiers) + ")"] = build_cascade(cfg)
        elif name == "cascade+llm":
            setups["cascade (rules+classifier+llm)"] = build_cascade(
                cfg, ["rules", "classifier", "llm"]
            )
        else:
            setups[name] = build_cascade(cfg, [name])

    console.print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} CPUs · "
        f"{platform.platform()} · Python {platform.python_version()}"
    )
    contexts, gold = load_splits(args.split)
    split = "+".join(args.split)
    if args.sweep_classifier:
        if not set(args.split) <= {"train", "dev"}:
            p.error("thresholds are chosen on dev; the held-out splits only report")
        sweep = []
        for threshold in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01):
            cascade = build_cascade(cfg.model_copy(update={"classifier_threshold": threshold}))
            verdicts, seconds = run(cascade, contexts)
            share = sum(v.tier == "encoder" for v in verdicts) / len(verdicts)
            sweep.append(
                score(
                    f"classifier ≥ {threshold:g} ({share:.0%} to encoder)", gold, verdicts, seconds
                )
            )
        console.print(table(f"cascade by classifier threshold on {split}", sweep))
        return
    if args.sweep:
        if not set(args.split) <= {"train", "dev"}:
            p.error("thresholds are chosen on dev; the held-out splits only report")
        sweep = []
        for threshold in (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.01):
            cascade = build_cascade(cfg.model_copy(update={"rules_threshold": threshold}))
            verdicts, seconds = run(cascade, contexts)
            sweep.append(score(f"rules ≥ {threshold:g}", gold, verdicts, seconds))
        console.print(table(f"cascade by rules threshold on {split}", sweep))
        return
    results = []
    for name, cascade in setups.items():
        verdicts, seconds = run(cascade, contexts)
        results.append(score(name, gold, verdicts, seconds))
    console.print(
        table(f"detector quality on the project's {split} split ({len(gold)} turns)", results)
    )

    rubrics = Table(title=f"per-rubric recall on {split} (hits/gold)")
    rubrics.add_column("rubric")
    for r in results:
        rubrics.add_column(r.name, justify="right")
    for rubric in [*SatRubric, *DsatRubric]:
        cells = []
        for r in results:
            hits, total = r.rubric_recall[rubric.value]
            cells.append(f"{hits / total:.2f} ({hits}/{total})" if total else "-")
        rubrics.add_row(rubric.value, *cells)
    console.print(rubrics)

    if args.uss.is_dir():
        for corpus, (ctxs, golds) in load_uss(args.uss, args.uss_per_corpus, args.seed).items():
            uss_results = []
            for name, cascade in setups.items():
                verdicts, seconds = run(cascade, ctxs)
                uss_results.append(score(name, golds, verdicts, seconds))
            counts = {k: sum(g.polarity == k for g in golds) for k in ("SAT", "DSAT", "NEUTRAL")}
            console.print(
                table(
                    f"out of domain: USS {corpus}, {len(golds)} sampled turns "
                    f"(SAT {counts['SAT']}, DSAT {counts['DSAT']}, NEUTRAL {counts['NEUTRAL']})",
                    uss_results,
                )
            )
    else:
        console.print(f"USS data not found at {args.uss}; pass --uss DIR", style="yellow")


if __name__ == "__main__":
    sys.exit(main())

"""Cross-validate an encoder-tier variant on the train split: is it as good as another?

5 folds over the train conversations (a conversation's turns stay in one fold). Per fold, the
lexical heads are refitted on the other four folds (C and rules scale as given) and an encoder
is fine-tuned with ``encoder_training.fine_tune`` at the variant's layers / tokens / answer tail;
both then judge the held-out fold. Printed for several blend weights (0 = lexical heads only,
1 = encoder only): SAT-present F1, DSAT-present F1 and 3-way macro-F1 of

* **every turn**: the blend judges every turn;
* **cascade**: rules ≥ ``--rules-threshold``, then the lexical heads ≥ ``--classifier-threshold``
  (temperature 1), then the blend, as the cascade with the encoder appended would decide.

Only train is read (never dev or a held-out split). Takes ~10 minutes for 3 layers over 48
tokens and ~25 for 6 over 64 on two cores. Compare variants by running it twice; the folds are
the same for the same ``--seed``.

    .venv/bin/python bench/detector_encoder_cv.py --layers 3 --max-length 48 --tail-chars 120
    .venv/bin/python bench/detector_encoder_cv.py --layers 6 --max-length 64 --tail-chars 200
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from services.detector.encoder_training import fine_tune
from services.detector.tiers.classifier import (
    POLARITIES,
    Lexicon,
    load_rules_tier,
    rules_features,
)
from services.detector.tiers.encoder import EncoderConfig, blend_probs, run_net, tokenize
from services.detector.training import (
    DATA_DIR,
    SEED,
    Split,
    fit_heads,
    load_split,
    polarity_metrics,
)

BLENDS = (0.0, 0.4, 0.5, 1.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=EncoderConfig().layers)
    p.add_argument("--max-length", type=int, default=EncoderConfig().max_length)
    p.add_argument("--tail-chars", type=int, default=EncoderConfig().assistant_tail_chars)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=7, help="fold assignment")
    p.add_argument("--c", type=float, default=32.0, help="lexical heads' C")
    p.add_argument("--rules-scale", type=float, default=0.5, help="stacked rules features' scale")
    p.add_argument("--rules-threshold", type=float, default=0.65)
    p.add_argument("--classifier-threshold", type=float, default=0.6)
    args = p.parse_args()

    import torch  # noqa: PLC0415

    torch.set_num_threads(2)
    console = Console(width=150)
    train = load_split(
        "train", DATA_DIR / "train.conversations.jsonl", DATA_DIR / "train.labels.jsonl"
    )
    conversations = sorted({label.conversation_id for label in train.labels})
    random.Random(args.seed).shuffle(conversations)
    fold_of = {c: i % args.folds for i, c in enumerate(conversations)}
    cfg = EncoderConfig(
        layers=args.layers, max_length=args.max_length, assistant_tail_chars=args.tail_chars
    )
    rules = load_rules_tier()
    rules_verdicts = rules.judge(train.contexts)
    n = len(train.labels)
    encoder_logits = np.zeros((n, len(POLARITIES)), dtype=np.float64)
    lexical_probs = np.zeros((n, len(POLARITIES)), dtype=np.float64)
    started = time.perf_counter()
    for k in range(args.folds):
        fit_rows = [i for i, lab in enumerate(train.labels) if fold_of[lab.conversation_id] != k]
        held_rows = [i for i, lab in enumerate(train.labels) if fold_of[lab.conversation_id] == k]

        def subset(rows: list[int]) -> Split:
            return Split(
                "train", [train.contexts[i] for i in rows], [train.labels[i] for i in rows]
            )

        fit, held = subset(fit_rows), subset(held_rows)
        lexicon = Lexicon.fit(fit.contexts, min_df=2)

        def features(split: Split, lexicon: Lexicon = lexicon) -> np.ndarray:
            stacked = rules_features(rules, split.contexts, args.rules_scale)
            return np.concatenate([lexicon.transform(split.contexts), stacked], axis=1)

        heads = fit_heads(features(fit), fit, args.c, SEED)
        lexical_probs[held_rows] = heads.polarity_probs(features(held), temperature=1.0)
        net, tokenizer = fine_tune(
            fit, cfg, epochs=args.epochs, lr=args.lr, batch_size=16, seed=0, say=lambda _: None
        )
        logits = run_net(
            net, tokenize(tokenizer, held.contexts, cfg), 16, int(tokenizer.pad_token_id or 0)
        )
        encoder_logits[held_rows] = logits[:, : len(POLARITIES)]
        console.print(f"fold {k + 1}/{args.folds} done ({time.perf_counter() - started:.0f} s)")

    gold = train.polarity
    table = Table(
        title=f"{args.folds}-fold CV over train ({n} turns): {args.layers} layers, "
        f"{args.max_length} tokens, answer tail {args.tail_chars} chars"
    )
    for col in ("blend", "judges", "SAT-present F1", "DSAT-present F1", "polarity macro-F1"):
        table.add_column(col, justify="right")
    for blend in BLENDS:
        probs = blend_probs(encoder_logits, lexical_probs, blend)
        every = [POLARITIES[int(j)].value for j in probs.argmax(axis=1)]
        cascade = []
        for i in range(n):
            if rules_verdicts[i].confidence >= args.rules_threshold:
                cascade.append(rules_verdicts[i].polarity.value)
            elif lexical_probs[i].max() >= args.classifier_threshold:
                cascade.append(POLARITIES[int(lexical_probs[i].argmax())].value)
            else:
                cascade.append(every[i])
        for name, pred in (("every turn", every), ("cascade", cascade)):
            m = polarity_metrics(gold, pred)
            table.add_row(
                f"{blend:g}",
                name,
                f"{m['sat_present_f1']:.3f}",
                f"{m['dsat_present_f1']:.3f}",
                f"{m['polarity_macro_f1']:.3f}",
            )
    console.print(table)


if __name__ == "__main__":
    main()

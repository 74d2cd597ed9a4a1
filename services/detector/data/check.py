"""Validate the detector dev/test dataset and print the count tables used in README.md.

Run: python services/detector/data/check.py   (exit status 0 = all checks passed)

Checks, per split (train, dev, test, holdout, holdout2, holdout3):
- every line of `<split>.conversations.jsonl` and `<split>.labels.jsonl` parses as the
  FORMATS.md record (roles user/assistant, an optional leading system message);
- every label points at a user message that follows at least one assistant message, and every
  such user message has exactly one label;
- rubric names, polarity, category, confidence and tier are valid, and polarity agrees with the
  rubrics (MIXED iff both lists are non-empty, SAT iff only `sat`, DSAT iff only `dsat`, NEUTRAL
  iff both are empty); category agrees with polarity (see README.md, "Labelling guidelines");
- conversation ids are unique across all splits;
- no user text is reused across the dataset (short stock replies such as "thanks!" at most
  three times), and no user turn of a held-out split (test, holdout, holdout2, holdout3) is a
  near copy of a train/dev one or of another held-out split.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SPLITS = ("train", "dev", "test", "holdout", "holdout2", "holdout3")
# evaluated only: no near copies of train/dev (or of each other) allowed
HELD_OUT = ("test", "holdout", "holdout2", "holdout3")

SAT_RUBRICS = (
    "Gratitude",
    "Learning",
    "Compliance",
    "Praise",
    "Personal_Details",
    "Humor",
    "Acknowledgment",
    "Positive_Closure",
    "Getting_There",
)
DSAT_RUBRICS = (
    "Negative_Feedback",
    "Revision",
    "Factual_Error",
    "Unrealistic_Expectation",
    "No_Engagement",
    "Ignored",
    "Lower_Quality",
    "Insufficient_Detail",
    "Style",
)
POLARITIES = ("NEUTRAL", "DSAT", "SAT", "MIXED")
CATEGORIES = (
    "rephrase",
    "aware_with_correction",
    "aware_without_correction",
    "clarification",
    "positive",
    "none",
)
LABEL_KEYS = {
    "conversation_id",
    "turn",
    "polarity",
    "sat",
    "dsat",
    "category",
    "confidence",
    "tier",
}
# Dataset-specific floors (README.md): every rubric at least this often per split.
MIN_RUBRIC = {"train": 4, "dev": 1, "test": 3, "holdout": 3, "holdout2": 4, "holdout3": 4}
SHORT_TEXT = 20  # user texts up to this length may repeat (at most MAX_SHORT_REPEATS times)
MAX_SHORT_REPEATS = 3
NEAR_COPY = 0.8  # Jaccard similarity of word sets that counts as a near copy


def polarity_of(sat: list[str], dsat: list[str]) -> str:
    if sat and dsat:
        return "MIXED"
    if sat:
        return "SAT"
    if dsat:
        return "DSAT"
    return "NEUTRAL"


def read_jsonl(path: Path, errors: list[str]) -> list[dict]:
    records: list[dict] = []
    if not path.exists():
        errors.append(f"{path.name}: missing")
        return records
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            errors.append(f"{path.name}:{lineno}: blank line")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{path.name}:{lineno}: not JSON ({exc})")
            continue
        if not isinstance(record, dict):
            errors.append(f"{path.name}:{lineno}: not a JSON object")
            continue
        record["_where"] = f"{path.name}:{lineno}"
        records.append(record)
    return records


def check_conversation(conv: dict, errors: list[str]) -> set[int]:
    """Validate one conversation; return the indices of the user turns that need a label."""
    where = conv["_where"]
    cid = conv.get("conversation_id")
    messages = conv.get("messages")
    if not isinstance(cid, str) or not cid:
        errors.append(f"{where}: conversation_id must be a non-empty string")
    if not isinstance(messages, list) or not messages:
        errors.append(f"{where}: messages must be a non-empty list")
        return set()
    eligible: set[int] = set()
    seen_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            errors.append(f"{where}: message {i} is not an object")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            errors.append(f"{where}: message {i} has role {role!r}")
        if role == "system" and i != 0:
            errors.append(f"{where}: system message at index {i}, only index 0 allowed")
        if not isinstance(content, str) or not content.strip():
            errors.append(f"{where}: message {i} has empty or non-string content")
        if role == "assistant":
            seen_assistant = True
        elif role == "user" and seen_assistant:
            eligible.add(i)
    for a, b in itertools.pairwise(messages):
        if isinstance(a, dict) and isinstance(b, dict) and a.get("role") == b.get("role"):
            errors.append(f"{where}: two consecutive {a.get('role')} messages")
    return eligible


def check_label(label: dict, errors: list[str]) -> None:
    where = label["_where"]
    keys = set(label) - {"_where"}
    if keys != LABEL_KEYS:
        errors.append(f"{where}: keys {sorted(keys)} != {sorted(LABEL_KEYS)}")
        return
    sat, dsat = label["sat"], label["dsat"]
    if not isinstance(sat, list) or any(r not in SAT_RUBRICS for r in sat):
        errors.append(f"{where}: bad sat rubrics {sat!r}")
        return
    if not isinstance(dsat, list) or any(r not in DSAT_RUBRICS for r in dsat):
        errors.append(f"{where}: bad dsat rubrics {dsat!r}")
        return
    if len(set(sat)) != len(sat) or len(set(dsat)) != len(dsat):
        errors.append(f"{where}: repeated rubric")
    polarity, category = label["polarity"], label["category"]
    if polarity not in POLARITIES:
        errors.append(f"{where}: bad polarity {polarity!r}")
    elif polarity != polarity_of(sat, dsat):
        errors.append(f"{where}: polarity {polarity} but rubrics say {polarity_of(sat, dsat)}")
    if category not in CATEGORIES:
        errors.append(f"{where}: bad category {category!r}")
    elif polarity == "SAT" and category != "positive":
        errors.append(f"{where}: a SAT turn must have category positive")
    elif polarity == "NEUTRAL" and category != "none":
        errors.append(f"{where}: a NEUTRAL turn must have category none")
    elif polarity in ("DSAT", "MIXED") and category == "positive":
        errors.append(f"{where}: a {polarity} turn takes a negative category, not positive")
    elif category == "none" and polarity != "NEUTRAL" and set(dsat) != {"No_Engagement"}:
        errors.append(f"{where}: category none on a feedback turn (only No_Engagement alone)")
    if label["confidence"] != 1.0 or label["tier"] != "human":
        errors.append(f"{where}: human labels need confidence 1.0 and tier 'human'")
    if not isinstance(label["turn"], int) or isinstance(label["turn"], bool):
        errors.append(f"{where}: turn must be an integer")


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
        for r in rows
    ]
    return "\n".join([f"\n### {title}\n", line, sep, *body])


def main() -> int:
    errors: list[str] = []
    seen_ids: dict[str, str] = {}
    per_split: dict[str, dict] = {}
    user_texts: dict[str, list[str]] = {}
    for split in SPLITS:
        convs = read_jsonl(HERE / f"{split}.conversations.jsonl", errors)
        labels = read_jsonl(HERE / f"{split}.labels.jsonl", errors)
        eligible: dict[str, set[int]] = {}
        by_id: dict[str, dict] = {}
        for conv in convs:
            cid = conv.get("conversation_id")
            turns = check_conversation(conv, errors)
            if not isinstance(cid, str):
                continue
            if cid in seen_ids:
                errors.append(f"{conv['_where']}: id {cid} already used in {seen_ids[cid]}")
            seen_ids[cid] = conv["_where"]
            if not cid.startswith(f"{split}-"):
                errors.append(f"{conv['_where']}: id {cid} should start with '{split}-'")
            eligible[cid] = turns
            by_id[cid] = conv
            for i in sorted(turns):
                text = conv["messages"][i]["content"].strip().lower()
                user_texts.setdefault(text, []).append(f"{cid}/{i}")
        labelled: Counter[tuple[str, int]] = Counter()
        for label in labels:
            check_label(label, errors)
            cid, turn = label.get("conversation_id"), label.get("turn")
            if cid not in eligible:
                errors.append(f"{label['_where']}: unknown conversation {cid!r}")
                continue
            if turn not in eligible[cid]:
                errors.append(
                    f"{label['_where']}: turn {turn} of {cid} is not a user message that "
                    "follows an assistant message"
                )
            labelled[(cid, turn)] += 1
        for cid, turns in eligible.items():
            for turn in sorted(turns):
                if labelled[(cid, turn)] != 1:
                    errors.append(f"{split}: {cid} turn {turn} has {labelled[(cid, turn)]} labels")
        for (cid, turn), n in labelled.items():
            if n > 1 and turn not in eligible.get(cid, set()):
                errors.append(f"{split}: {cid} turn {turn} labelled {n} times")
        per_split[split] = {"convs": by_id, "labels": labels}

    for text, where in user_texts.items():
        limit = MAX_SHORT_REPEATS if len(text) <= SHORT_TEXT else 1
        if len(where) > limit:
            errors.append(f"user text {text[:40]!r} used {len(where)} times: {', '.join(where)}")
    train_dev = [w for split in ("train", "dev") for _, w in user_words(per_split[split])]
    held_out = {split: user_words(per_split[split]) for split in HELD_OUT}
    for split, turns in held_out.items():
        others = train_dev + [w for o, ws in held_out.items() if o != split for _, w in ws]
        for where, w in turns:
            if len(w) < 5:
                continue
            for other in others:
                if len(w & other) / len(w | other) >= NEAR_COPY:
                    errors.append(f"{split} {where}: near copy of a turn in another split")
                    break

    report(per_split, errors)
    if errors:
        sys.stderr.write(f"\n{len(errors)} problem(s):\n")
        for error in errors:
            sys.stderr.write(f"  {error}\n")
        return 1
    sys.stdout.write("\nOK: all checks passed\n")
    return 0


def user_words(split: dict[str, Any]) -> list[tuple[str, set[str]]]:
    """(``conversation/turn``, word set) of every labelled user turn of a split."""
    out = []
    for lab in split["labels"]:
        conv = split["convs"].get(lab["conversation_id"])
        if conv is None or not isinstance(lab.get("turn"), int):
            continue
        if lab["turn"] < len(conv["messages"]):
            text = conv["messages"][lab["turn"]]["content"]
            out.append((f"{lab['conversation_id']}/{lab['turn']}", words(text)))
    return out


def report(per_split: dict[str, dict], errors: list[str]) -> None:
    out: list[str] = []
    rows = []
    totals: Counter[str] = Counter()
    for split in SPLITS:
        labels = per_split[split]["labels"]
        pol = Counter(lab.get("polarity") for lab in labels)
        n = len(labels)
        row = [split, str(len(per_split[split]["convs"])), str(n)]
        for p in POLARITIES:
            row.append(f"{pol[p]} ({100 * pol[p] / max(n, 1):.0f}%)")
            totals[p] += pol[p]
        totals["convs"] += len(per_split[split]["convs"])
        totals["n"] += n
        rows.append(tuple(row))
    rows.append(
        (
            "total",
            str(totals["convs"]),
            str(totals["n"]),
            *(f"{totals[p]} ({100 * totals[p] / max(totals['n'], 1):.0f}%)" for p in POLARITIES),
        )
    )
    out.append(
        table(
            "Turns and polarity per split",
            rows,
            ("split", "conversations", "labelled turns", *POLARITIES),
        )
    )

    rubric_rows = []
    for kind, names in (("sat", SAT_RUBRICS), ("dsat", DSAT_RUBRICS)):
        for name in names:
            counts = [
                sum(name in lab.get(kind, []) for lab in per_split[s]["labels"]) for s in SPLITS
            ]
            for split, count in zip(SPLITS, counts, strict=True):
                if count < MIN_RUBRIC[split]:
                    errors.append(f"{split}: rubric {name} used {count} < {MIN_RUBRIC[split]}")
            rubric_rows.append((kind.upper(), name, *map(str, counts), str(sum(counts))))
    out.append(
        table(
            "Rubric counts (turns carrying the rubric)",
            rubric_rows,
            ("", "rubric", *SPLITS, "total"),
        )
    )

    cat_rows = []
    for cat in CATEGORIES:
        counts = [sum(lab.get("category") == cat for lab in per_split[s]["labels"]) for s in SPLITS]
        cat_rows.append((cat, *map(str, counts), str(sum(counts))))
    out.append(table("Don-Yehiya category counts", cat_rows, ("category", *SPLITS, "total")))

    langs = sorted(
        {
            c.get("meta", {}).get("language", "?")
            for s in SPLITS
            for c in per_split[s]["convs"].values()
        }
    )
    lang_rows = []
    for lang in langs:
        counts = []
        for split in SPLITS:
            convs = per_split[split]["convs"]
            n = sum(
                1
                for lab in per_split[split]["labels"]
                if convs.get(lab.get("conversation_id"), {}).get("meta", {}).get("language") == lang
            )
            counts.append(n)
        lang_rows.append((lang, *map(str, counts), str(sum(counts))))
    share = []
    for split in SPLITS:
        convs = per_split[split]["convs"]
        labels = per_split[split]["labels"]
        other = sum(
            1
            for lab in labels
            if convs.get(lab.get("conversation_id"), {}).get("meta", {}).get("language") != "en"
        )
        share.append(f"{100 * other / max(len(labels), 1):.0f}%")
    lang_rows.append(("non-English share", *share, ""))
    out.append(
        table("Labelled turns per conversation language", lang_rows, ("language", *SPLITS, "total"))
    )

    domains = sorted(
        {
            c.get("meta", {}).get("domain", "?")
            for s in SPLITS
            for c in per_split[s]["convs"].values()
        }
    )
    dom_rows = []
    for dom in domains:
        counts = [
            sum(c.get("meta", {}).get("domain") == dom for c in per_split[s]["convs"].values())
            for s in SPLITS
        ]
        dom_rows.append((dom, *map(str, counts), str(sum(counts))))
    out.append(table("Conversations per domain", dom_rows, ("domain", *SPLITS, "total")))
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())

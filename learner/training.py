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


def _device() -> tuple[str, Any]:
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return "cuda", dtype
    return "cpu", torch.float32


def build_config(
    method: Method,
    settings: LearnerSettings,
    output_dir: Path,
    *,
    max_steps: int | None,
    device: str,
    dtype: Any,
) -> Any:
    """The DPOConfig / KTOConfig of the project's training configuration."""
    import torch  # noqa: PLC0415
    from trl import DPOConfig, KTOConfig  # noqa: PLC0415

    common: dict[str, Any] = {
        "output_dir": str(output_dir),
        "learning_rate": settings.learning_rate,
        "beta": settings.beta,
        "num_train_epochs": settings.epochs,
        "max_steps": max_steps if max_steps is not None else -1,
        "per_device_train_batch_size": settings.batch_size,
        "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        "warmup_steps": settings.warmup_ratio,  # a float in [0, 1) is a ratio (transformers 5)
        "lr_scheduler_type": "cosine",
        "max_length": settings.max_length,
        "gradient_checkpointing": settings.gradient_checkpointing,
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
    }
    if settings.gradient_checkpointing:
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
    from peft import LoraConfig  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from trl import DPOTrainer, KTOTrainer  # noqa: PLC0415

    device, dtype = _device()
    torch.manual_seed(settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=dtype)
    targets = settings.lora_target_modules
    peft_config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
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
        examples_per_step = settings.batch_size * settings.gradient_accumulation_steps
        config = build_config(
            method, settings, work / "trainer", max_steps=max_steps, device=device, dtype=dtype
        )
        trainer_cls = DPOTrainer if method == "dpo" else KTOTrainer
        trainer = trainer_cls(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=_trainer_callbacks(settings, on_step, tokens_per_example, examples_per_step),
        )
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        history = [h for h in trainer.state.log_history if "loss" in h]
        final = history[-1] if history else {}
        loss = float(final.get("loss", result.training_loss))
        if not math.isfinite(loss):
            raise TrainingDivergedError(f"final loss {loss}")
        staged = work / "adapter"
        trainer.save_model(str(staged))
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
            hyperparameters=hyperparameters(settings, method, max_steps),
            metrics=metrics,
            code_revision=code_revision(),
            started_at=started.isoformat(),
            finished_at=datetime.now(UTC).isoformat(),
            device=device if device == "cpu" else torch.cuda.get_device_name(0),
        )
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

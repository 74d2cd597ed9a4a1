"""A real LoRA adapter for the tests: a few steps of TRL's ``DPOTrainer`` on CPU.

The adapter is trained, not fabricated, so the tests exercise the same folder layout
(``adapter_config.json`` + ``adapter_model.safetensors``) the learner produces and vLLM loads at
run time. Its quality is irrelevant: two steps on four preference pairs.

torch, TRL, PEFT and datasets are imported inside the function, so importing this module (e.g.
during test collection) costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# Conversational preference pairs (TRL's "prompt / chosen / rejected" format).
PREFERENCES: list[dict[str, Any]] = [
    {
        "prompt": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": [{"role": "assistant", "content": "The capital of France is Paris."}],
        "rejected": [{"role": "assistant", "content": "I don't know, maybe Lyon?"}],
    },
    {
        "prompt": [{"role": "user", "content": "How many legs does a spider have?"}],
        "chosen": [{"role": "assistant", "content": "A spider has eight legs."}],
        "rejected": [{"role": "assistant", "content": "Spiders have six legs."}],
    },
    {
        "prompt": [{"role": "user", "content": "Say hello politely."}],
        "chosen": [{"role": "assistant", "content": "Hello! How can I help you today?"}],
        "rejected": [{"role": "assistant", "content": "What do you want?"}],
    },
    {
        "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "2 + 2 = 4."}],
        "rejected": [{"role": "assistant", "content": "2 + 2 = 5."}],
    },
]


def train_dpo_adapter(model_dir: Path, out_dir: Path, steps: int = 2) -> Path:
    """Train a rank-8 LoRA adapter on every linear layer of the model in ``model_dir`` with DPO
    for ``steps`` optimizer steps on CPU and save it as a PEFT adapter folder in ``out_dir``.

    Takes ~10-20 s for SmolLM2-135M on 2 cores (model load included). Returns ``out_dir``.
    """
    import torch  # noqa: PLC0415 - training libraries load only when a test trains
    from datasets import Dataset  # noqa: PLC0415
    from peft import LoraConfig  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415
    from trl import DPOConfig, DPOTrainer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        max_length=128,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(PREFERENCES),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    trainer.train()
    trainer.save_model(str(out_dir))
    if not (out_dir / "adapter_config.json").is_file():
        raise RuntimeError(f"DPO training saved no PEFT adapter in {out_dir}")
    return out_dir


@pytest.fixture(scope="session", name="dpo_adapter")
def dpo_adapter_fixture(tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path) -> Path:
    """A DPO-trained LoRA adapter for the session's ``base_model_dir``, trained once per session
    (however many modules import this fixture)."""
    out_dir = tmp_path_factory.getbasetemp() / "dpo-adapter"
    if (out_dir / "adapter_config.json").is_file():
        return out_dir
    return train_dpo_adapter(base_model_dir, out_dir)

"""LoRA adapter folders for tests, built for a real base model.

A freshly initialised LoRA adapter is a no-op (PEFT zeroes ``lora_B``), so serving it would not
show whether the adapter was applied. ``init_lora_weights=False`` keeps both matrices random:
the adapter then measurably changes greedy output while the text stays readable, which is what
the backend tests need to tell base, adapter and mixed-up requests apart.
"""

from __future__ import annotations

from pathlib import Path


def build_lora_adapter(model_dir: Path, out: Path, *, seed: int, rank: int = 8) -> Path:
    """Save a LoRA adapter with random (seeded, hence reproducible) weights into ``out``.

    The folder is what TRL's trainers save: ``adapter_config.json`` plus
    ``adapter_model.safetensors``, loadable by PEFT and by vLLM. The process-wide torch random
    state is left as it was.
    """
    import torch  # noqa: PLC0415 - only tests that build adapters need torch
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules="all-linear",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    return out

"""``inspect_adapter``: a LoRA folder is checked from its config and safetensors header alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.adapters import InvalidAdapterError, inspect_adapter

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def write_adapter(
    folder: Path,
    *,
    rank: int = 4,
    weight_rank: int | None = None,
    config: dict[str, object] | None = None,
    modules: list[str] = MODULES,
) -> Path:
    """A PEFT-layout adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    r = weight_rank or rank
    tensors = {}
    for module in modules:
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.zeros((r, 16), np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.zeros((32, r), np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    body = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "base_model_name_or_path": "SmolLM2-135M-Instruct",
        **(config or {}),
    }
    (folder / "adapter_config.json").write_text(json.dumps(body))
    return folder


def test_a_well_formed_adapter_is_described(tmp_path: Path) -> None:
    info = inspect_adapter(write_adapter(tmp_path / "ok"))

    assert info.rank == 4 and info.alpha == 8.0
    assert info.base_model == "SmolLM2-135M-Instruct"
    assert info.target_modules == tuple(sorted(f"base_model.model.{m}" for m in MODULES))
    assert info.tensors == 4


def test_weights_whose_rank_disagrees_with_the_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match=r"rank 8 .* r=4"):
        inspect_adapter(write_adapter(tmp_path / "a", rank=4, weight_rank=8))


def test_a_rank_pattern_sets_the_rank_of_the_modules_it_names(tmp_path: Path) -> None:
    folder = write_adapter(
        tmp_path / "a", rank=8, weight_rank=4, config={"rank_pattern": {"q_proj": 4}}
    )
    with pytest.raises(InvalidAdapterError, match="down_proj has rank 4"):
        inspect_adapter(folder)  # q_proj is rank 4 by the pattern; down_proj should be 8
    only_q = write_adapter(
        tmp_path / "b",
        rank=8,
        weight_rank=4,
        config={"rank_pattern": {"q_proj": 4}},
        modules=MODULES[:1],
    )
    assert inspect_adapter(only_q).rank == 8


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json is missing"),
        (lambda f: (f / "adapter_config.json").write_text("{not json"), "not valid JSON"),
        (lambda f: (f / "adapter_config.json").write_text("[1]"), "JSON object"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "weights"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\0" * 64), "not a safetensors"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\1"), "too short"),
        (
            lambda f: (f / "adapter_model.safetensors").write_bytes(
                (f / "adapter_model.safetensors").read_bytes()[:-100]
            ),
            "outside the file",
        ),
    ],
    ids=["no-config", "garbled-config", "config-not-object", "no-weights", "zeros", "tiny", "cut"],
)
def test_broken_files_are_refused_with_a_reason(
    tmp_path: Path, spoil: object, message: str
) -> None:
    folder = write_adapter(tmp_path / "a")
    spoil(folder)  # type: ignore[operator]
    with pytest.raises(InvalidAdapterError, match=message):
        inspect_adapter(folder)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "not LORA"),
        ({"r": 0}, "positive integer"),
        ({"r": "8"}, "positive integer"),
        ({"lora_alpha": "x"}, "lora_alpha"),
    ],
)
def test_configs_that_are_not_a_lora_are_refused(
    tmp_path: Path, config: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidAdapterError, match=message):
        inspect_adapter(write_adapter(tmp_path / "a", config=config))


def test_a_folder_without_lora_weights_or_with_half_a_pair_is_refused(tmp_path: Path) -> None:
    folder = write_adapter(tmp_path / "a")
    save_file(
        {"other.weight": np.zeros((2, 2), np.float32)}, str(folder / "adapter_model.safetensors")
    )
    with pytest.raises(InvalidAdapterError, match="no LoRA weights"):
        inspect_adapter(folder)

    half = {"m.lora_A.weight": np.zeros((4, 8), np.float32)}
    save_file(half, str(folder / "adapter_model.safetensors"))
    with pytest.raises(InvalidAdapterError, match="lacks lora_A or lora_B"):
        inspect_adapter(folder)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidAdapterError, match="No adapter found"):
        inspect_adapter(tmp_path / "nowhere")

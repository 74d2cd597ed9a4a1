"""The GPU training configuration's batch plan and the throughput benchmark's accounting
(bench/train_gpu.py), checked without a GPU: arithmetic only, nothing timed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from learner.training import BatchPlan, activation_bytes_per_token, build_config, gpu_batch_plan
from services.settings import LearnerSettings

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
QWEN_1_5B = SimpleNamespace(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_gpu", ROOT / "bench" / "train_gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpu"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_activation_estimate_matches_the_measured_qwen_layer() -> None:
    assert activation_bytes_per_token(QWEN_1_5B) == 28 * 103_424


@pytest.mark.parametrize(
    ("method", "max_length", "batch", "accum"),
    [("dpo", 1024, 8, 4), ("dpo", 2048, 4, 8), ("kto", 1024, 16, 2), ("kto", 2048, 8, 4)],
)
def test_on_a_large_gpu_micro_batches_fill_the_token_budget_without_checkpointing(
    method: str, max_length: int, batch: int, accum: int
) -> None:
    plan = gpu_batch_plan(
        method,  # type: ignore[arg-type]
        LearnerSettings(max_length=max_length),
        bytes_per_token=activation_bytes_per_token(QWEN_1_5B),
        available_bytes=60 * GIB,
    )
    assert plan == BatchPlan(batch, accum, gradient_checkpointing=False)
    assert plan.per_device_batch_size * plan.gradient_accumulation_steps == 32  # unchanged


def test_micro_batches_shrink_to_fit_the_memory_before_checkpointing_is_used() -> None:
    settings = LearnerSettings(max_length=2048)
    per_token = activation_bytes_per_token(QWEN_1_5B)
    # two pairs (8,192 tokens) fit in 25 GiB, four do not
    plan = gpu_batch_plan("dpo", settings, bytes_per_token=per_token, available_bytes=25 * GIB)
    assert plan == BatchPlan(2, 16, gradient_checkpointing=False)
    # not even one pair fits: checkpointing, with the token budget's micro-batch
    plan = gpu_batch_plan("dpo", settings, bytes_per_token=per_token, available_bytes=GIB)
    assert plan == BatchPlan(4, 8, gradient_checkpointing=True)


def test_kto_micro_batches_keep_two_examples_for_the_kl_term() -> None:
    settings = LearnerSettings(max_length=16384, gpu_micro_batch_tokens=8192)
    plan = gpu_batch_plan("kto", settings, bytes_per_token=1, available_bytes=GIB)
    assert plan.per_device_batch_size == 2


def test_without_a_memory_estimate_or_when_forced_the_settings_decide() -> None:
    settings = LearnerSettings(max_length=1024)
    plan = gpu_batch_plan("dpo", settings, bytes_per_token=None, available_bytes=None)
    assert plan.gradient_checkpointing is settings.gradient_checkpointing
    forced = LearnerSettings(max_length=1024, gpu_gradient_checkpointing="on")
    plan = gpu_batch_plan("dpo", forced, bytes_per_token=1, available_bytes=100 * GIB)
    assert plan.gradient_checkpointing is True
    as_given = LearnerSettings(max_length=1024, gpu_micro_batch_tokens=0)
    plan = gpu_batch_plan("dpo", as_given, bytes_per_token=1, available_bytes=100 * GIB)
    assert plan == BatchPlan(4, 8, gradient_checkpointing=False)


def test_the_cpu_configuration_is_the_settings_own(tmp_path: Path) -> None:
    settings = LearnerSettings()
    config = build_config(
        "dpo", settings, tmp_path, max_steps=1, device="cpu", dtype=torch.float32, model=None
    )
    assert config.per_device_train_batch_size == settings.batch_size
    assert config.gradient_accumulation_steps == settings.gradient_accumulation_steps
    assert config.gradient_checkpointing is settings.gradient_checkpointing


def test_the_meter_counts_real_tokens_and_scored_positions(bench: ModuleType) -> None:
    # two sequences of 4 and 2 real tokens (padded to 4); completions of 2 and 1 tokens
    batch = {
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
        "completion_mask": torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0]]),
    }
    compact = bench.Meter(torch.device("cpu"), compact=True)
    compact.add(batch)
    assert compact.read() == [6.0, 20.0, 3.0, 0.0, 0.0, 0.0, 2.0]
    padded = bench.Meter(torch.device("cpu"), compact=False)
    padded.add(batch)
    assert padded.read()[2] == 6.0  # every position but the last of each row


def test_the_flops_follow_the_documented_accounting(bench: ModuleType) -> None:
    shape = bench.Shape(layers=2, attn_width=8, body_params=100, head_params=10, lora_params=1)
    # 10 trained tokens in sequences of 5 (sum of squares 50), 6 scored; no KL sequences
    dpo = bench.flops(shape, [10.0, 50.0, 6.0, 0.0, 0.0, 0.0, 2.0])
    assert dpo == (6 * 100 + 6 * 1) * 10 + 6 * 10 * 6 + 8 * 2 * 8 * 50
    kl = bench.flops(shape, [0.0, 0.0, 0.0, 10.0, 50.0, 6.0, 2.0])
    assert kl == (4 * 100 + 2 * 1) * 10 + 4 * 10 * 6 + 4 * 2 * 8 * 50

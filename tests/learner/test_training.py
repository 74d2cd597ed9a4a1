"""LoRA DPO and KTO training on CPU with the real SmolLM2-135M-Instruct: the adapter loads in
PEFT and in vLLM and changes the model; a diverging run leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.dataset import read_manifest
from learner.records import ADAPTER_MANIFEST_FILE, AdapterManifest
from learner.training import TrainingDivergedError, TrainingError, train_adapter
from services.adapters import inspect_adapter
from tests.learner.conftest import small_training
from tests.support.vllm_server import VllmServer

pytestmark = pytest.mark.slow

PROBE = [{"role": "user", "content": "What is the boiling point of water in Fahrenheit?"}]


def train(
    data: Path, out: Path, base_model_dir: Path, method: str, *, steps: int, **settings: object
):  # type: ignore[no-untyped-def]
    """``steps`` optimizer steps of the real trainer with the small CPU settings (+ overrides)."""
    return train_adapter(
        data,
        out,
        settings=small_training(**settings),
        base_model_dir=base_model_dir,
        base_model_name="SmolLM2-135M-Instruct",
        method=method,  # type: ignore[arg-type]
        run_id=f"test-{out.name}",
        max_steps=steps,
    )


def logits(model_dir: Path, adapter: Path | None):  # type: ignore[no-untyped-def]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    inputs = tokenizer.apply_chat_template(
        PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        return model(**inputs).logits[0, -1]


@pytest.fixture(scope="module")
def dpo_adapter(
    tmp_path_factory: pytest.TempPathFactory, base_model_dir: Path, dataset_dir: Path
) -> Path:
    out = tmp_path_factory.mktemp("dpo") / "adapter"
    train(dataset_dir, out, base_model_dir, "dpo", steps=3)
    return out


def test_dpo_writes_a_peft_adapter_with_its_lineage(dpo_adapter: Path, dataset_dir: Path) -> None:
    info = inspect_adapter(dpo_adapter)
    assert info.rank == 8
    manifest = AdapterManifest.model_validate_json(
        (dpo_adapter / ADAPTER_MANIFEST_FILE).read_text()
    )
    assert manifest.method == "dpo"
    assert manifest.data_manifest_hash == read_manifest(dataset_dir).content_hash
    assert manifest.metrics["steps"] == 3
    assert manifest.base_model_hash and len(manifest.base_model_hash) == 64
    assert manifest.hyperparameters["lora_r"] == 8
    assert manifest.device == "cpu"
    assert "rewards_margins" in manifest.metrics
    assert not (dpo_adapter / "training_args.bin").exists()


def test_the_dpo_adapter_changes_the_model_output(dpo_adapter: Path, base_model_dir: Path) -> None:
    base = logits(base_model_dir, None)
    tuned = logits(base_model_dir, dpo_adapter)
    assert float((base - tuned).abs().max()) > 1e-3


def test_kto_trains_from_the_unpaired_examples(
    tmp_path: Path, base_model_dir: Path, dataset_dir: Path
) -> None:
    out = tmp_path / "kto"
    manifest = train(dataset_dir, out, base_model_dir, "kto", steps=2)
    assert manifest.method == "kto"
    assert manifest.metrics["steps"] == 2
    assert inspect_adapter(out).rank == 8
    base = logits(base_model_dir, None)
    assert float((base - logits(base_model_dir, out)).abs().max()) > 1e-4


def test_a_run_whose_loss_exceeds_the_bound_aborts_and_leaves_nothing(
    tmp_path: Path, base_model_dir: Path, dataset_dir: Path
) -> None:
    out = tmp_path / "diverged"
    with pytest.raises(TrainingDivergedError, match="loss"):
        train(dataset_dir, out, base_model_dir, "dpo", steps=2, max_loss=1e-6)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left either


def test_a_dataset_whose_files_do_not_match_the_manifest_is_refused(
    tmp_path: Path, base_model_dir: Path, dataset_dir: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(dataset_dir, broken)
    with (broken / "pairs.jsonl").open("a") as fh:
        fh.write(json.dumps({"tampered": True}) + "\n")
    with pytest.raises(TrainingError, match="differs from the manifest"):
        train(broken, tmp_path / "out", base_model_dir, "dpo", steps=1)


def test_vllm_loads_the_learner_s_adapter_at_run_time(
    dpo_adapter: Path, vllm_server: VllmServer
) -> None:
    root = vllm_server.base_url.removesuffix("/v1")
    with httpx.Client(base_url=root, timeout=120) as client:
        loaded = client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "learner-dpo", "lora_path": str(dpo_adapter)},
        )
        assert loaded.status_code == 200, loaded.text
        names = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert "learner-dpo" in names
        answer = client.post(
            "/v1/chat/completions",
            json={"model": "learner-dpo", "messages": PROBE, "max_tokens": 8, "temperature": 0},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]


def test_an_sft_warm_up_trains_the_same_adapter_before_dpo(
    tmp_path: Path, base_model_dir: Path, dataset_dir: Path
) -> None:
    out = tmp_path / "sft-dpo"
    manifest = train(dataset_dir, out, base_model_dir, "dpo", steps=1, sft_warmup_steps=1)
    assert manifest.hyperparameters["sft_warmup_steps"] == 1
    assert inspect_adapter(out).rank == 8
    base = logits(base_model_dir, None)
    assert float((base - logits(base_model_dir, out)).abs().max()) > 1e-3

from __future__ import annotations

from pathlib import Path

import pytest

from learner.batch import assemble
from learner.builder import Builder
from learner.dataset import write_dataset
from services.settings import LearnerSettings
from tests.learner.corpus import CONVERSATIONS, LABELS, flood, labelled
from tests.support.vllm_server import vllm_server_fixture  # noqa: F401 - fixture


def small_training(**overrides: object) -> LearnerSettings:
    """Settings for a few CPU steps that visibly move the model (a test, not a recipe)."""
    values: dict[str, object] = {
        "learning_rate": 5e-4,
        "batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_length": 192,
        "lora_r": 8,
        "lora_alpha": 16,
        "gradient_checkpointing": False,
        "warmup_ratio": 0.0,
        "max_user_share": 1.0,
    }
    values.update(overrides)
    return LearnerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset built from the fixture corpus (natural pairs and balanced KTO examples)."""
    settings = LearnerSettings(strategy="natural", max_user_share=1.0)
    convs, labels = flood("u-flood", 4)
    built = Builder(settings).build(labelled(c, LABELS + labels) for c in [*CONVERSATIONS, *convs])
    batch = assemble(built.pairs, built.unpaired, settings, built.drops)
    out = tmp_path_factory.mktemp("learner") / "dataset"
    write_dataset(out, batch, origin="tests", settings=settings.model_dump(mode="json"))
    return out

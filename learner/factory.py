"""Build the learner's parts from the settings: the regenerator (generator + checklist judge)."""

from __future__ import annotations

import logging
from pathlib import Path

from learner.builder import Regenerator
from services.chat import ChatEndpoint, ChatModel
from services.judging import ChecklistJudge
from services.settings import WildloopSettings
from services.store.learning import LearningStore

log = logging.getLogger(__name__)


class LearnerConfigError(ValueError):
    """The settings ask for something that cannot be built (the message says what to set)."""


def build_regenerator(
    settings: WildloopSettings,
    *,
    base_model_dir: Path | None,
    store: LearningStore | None = None,
) -> Regenerator | None:
    """The regenerator the settings describe, or None when regenerated pairs are off or no
    judge is configured (they are then counted as dropped, reason ``no_generator_or_judge``)."""
    learner = settings.learner
    if learner.strategy == "natural":
        return None
    if not learner.judge_url:
        log.warning(
            "regenerated pairs need a checklist judge: set WILDLOOP_LEARNER__JUDGE_URL and "
            "WILDLOOP_LEARNER__JUDGE_MODEL; only natural pairs are built"
        )
        return None
    if not learner.judge_model:
        raise LearnerConfigError("WILDLOOP_LEARNER__JUDGE_MODEL is not set")
    judge_endpoint = ChatEndpoint(
        learner.judge_url, learner.judge_model, api_key=learner.judge_api_key
    )
    generator: ChatModel
    if learner.generator == "expert":
        if not learner.generator_url or not learner.generator_model:
            raise LearnerConfigError(
                "generator=expert needs WILDLOOP_LEARNER__GENERATOR_URL and __GENERATOR_MODEL"
            )
        generator = ChatEndpoint(
            learner.generator_url, learner.generator_model, api_key=learner.generator_api_key
        )
    else:
        production = store.store.production_adapter() if store is not None else None
        if settings.vllm_url:
            name = production.id if production is not None else settings.base_model
            generator = ChatEndpoint(settings.vllm_url, name, api_key=settings.vllm_api_key)
        else:
            if base_model_dir is None:
                raise LearnerConfigError("the on-policy generator needs the base model")
            from learner.local_model import LocalChatModel  # noqa: PLC0415 - torch on demand

            generator = LocalChatModel(
                base_model_dir,
                adapter_dir=Path(production.path) if production is not None else None,
                name=production.id if production is not None else settings.base_model,
            )
    return Regenerator(
        generator,
        ChecklistJudge(judge_endpoint),
        max_tokens=learner.generator_max_tokens,
        summarizer=judge_endpoint if learner.summarizer == "llm" else None,
    )

"""Build the configured cascade from settings (tiers are imported only when used)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from services.detector.cascade import Cascade, CascadeMetrics, Stage
from services.detector.judgement import Tier
from services.settings import DetectorSettings

TIER_NAMES = ("rules", "classifier", "encoder", "llm")


class DetectorConfigError(ValueError):
    """The detector cannot be built as configured (the message says what to set)."""


def build_tier(name: str, cfg: DetectorSettings) -> Tier:
    if name == "rules":
        from services.detector.tiers.rules import RulesTier  # noqa: PLC0415

        return RulesTier()
    if name in ("classifier", "encoder"):
        return _load_learned_tier(name, cfg)
    if name == "llm":
        if not cfg.llm_url or not cfg.llm_model:
            raise DetectorConfigError(
                "the llm tier needs WILDLOOP_DETECTOR__LLM_URL and WILDLOOP_DETECTOR__LLM_MODEL"
            )
        from services.detector.tiers.llm import LlmTier  # noqa: PLC0415

        return LlmTier(
            base_url=cfg.llm_url,
            model=cfg.llm_model,
            api_key=cfg.llm_api_key,
            timeout_s=cfg.llm_timeout_s,
            max_retries=cfg.llm_max_retries,
            concurrency=cfg.llm_concurrency,
            structured_output=cfg.llm_structured_output,
            history_messages=cfg.history_messages,
            max_output_tokens=cfg.llm_max_output_tokens,
            max_context_chars=cfg.llm_max_context_chars,
            domain_and_intent=cfg.llm_domain_and_intent,
        )
    raise DetectorConfigError(f"unknown tier {name!r}; choose from {', '.join(TIER_NAMES)}")


def _load_learned_tier(name: str, cfg: DetectorSettings) -> Tier:
    """The packaged classifier or encoder tier, or a ``DetectorConfigError`` that says why not."""
    try:
        if name == "classifier":
            from services.detector.tiers.classifier import ClassifierTier  # noqa: PLC0415

            loader: Callable[[], Tier] = ClassifierTier.load
        else:
            from services.detector.tiers.encoder import EncoderTier  # noqa: PLC0415

            loader = functools.partial(EncoderTier.load, dtype=cfg.encoder_dtype)
    except ImportError as exc:
        raise DetectorConfigError(
            f"the {name} tier needs the detector extra (pip install 'wildloop[detector]'): {exc}"
        ) from exc
    try:
        return loader()
    except (OSError, ValueError) as exc:
        raise DetectorConfigError(f"cannot load the {name} tier: {exc}") from exc


def threshold_for(name: str, cfg: DetectorSettings) -> float:
    return {
        "rules": cfg.rules_threshold,
        "classifier": cfg.classifier_threshold,
        "encoder": cfg.encoder_threshold,
    }.get(name, 0.0)


def build_cascade(
    cfg: DetectorSettings,
    tiers: Sequence[str] | None = None,
    *,
    metrics: CascadeMetrics | None = None,
) -> Cascade:
    names = list(tiers or cfg.tiers)
    if not names:
        raise DetectorConfigError("no detector tiers configured")
    if len(set(names)) != len(names):
        raise DetectorConfigError(f"a tier is listed twice: {','.join(names)}")
    limit_blas_threads(cfg.blas_threads)
    stages = [Stage(build_tier(n, cfg), threshold_for(n, cfg)) for n in names]
    return Cascade(stages, metrics=metrics)


def limit_blas_threads(threads: int | None) -> None:
    """Cap numpy/scipy's BLAS thread pools for this process (see ``DetectorSettings.
    blas_threads``); a no-op when ``threads`` is None or threadpoolctl is not installed (the
    rules tier alone needs neither)."""
    if threads is None:
        return
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
    except ImportError:
        return
    threadpool_limits(limits=threads, user_api="blas")

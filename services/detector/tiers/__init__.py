"""Detector tiers: rules (tier 1), classifier (tier 2), LLM judge (tier 3)."""

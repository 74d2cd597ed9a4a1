"""Checklist-guided pairwise evaluation gate for candidate adapters (depends on ``services``)."""

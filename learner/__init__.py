"""Preference batches from detected feedback and LoRA DPO/KTO training (depends on ``services``)."""

"""The OpenAI-compatible chat gateway (depends on ``services`` only)."""

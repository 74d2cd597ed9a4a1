"""Chat backends: one interface (``base``), two implementations (``local``, ``vllm``)."""

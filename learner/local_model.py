"""The policy itself, in process: transformers (+ the production LoRA adapter, if any) answering
chats for on-policy regeneration in the embedded mode. In production the policy is the vLLM
server instead (``services.chat.ChatEndpoint`` on ``WILDLOOP_VLLM_URL``).

``response_format`` is not enforced here (no guided decoding); do not use this as a judge.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from services.chat import ChatError


class LocalChatModel:
    def __init__(self, model_dir: Path, *, adapter_dir: Path | None = None, name: str) -> None:
        import torch  # noqa: PLC0415
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self.name = name
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        if adapter_dir is not None:
            from peft import PeftModel  # noqa: PLC0415

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.eval()
        self._lock = threading.Lock()

    def complete(
        self,
        messages: list[dict[str, str]],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        response_format: dict[str, Any] | None = None,
    ) -> str:
        del response_format  # not enforceable without guided decoding
        try:
            inputs = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            sampling: dict[str, Any] = (
                {"do_sample": True, "temperature": temperature, "top_p": 0.95}
                if temperature > 0
                else {"do_sample": False}
            )
            with self._lock, self._torch.inference_mode():
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=max_tokens,
                    pad_token_id=self.tokenizer.eos_token_id,
                    **sampling,
                )
        except Exception as exc:
            raise ChatError(f"local model {self.name}: {type(exc).__name__}: {exc}") from exc
        new = output[0][inputs["input_ids"].shape[1] :]
        return str(self.tokenizer.decode(new, skip_special_tokens=True)).strip()

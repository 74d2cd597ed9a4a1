"""Check a PEFT LoRA adapter folder before anything serves it.

A model server that is handed a broken adapter fails late or, worse, not at all: vLLM 0.32 loads
an adapter whose ``adapter_config.json`` states a different rank from its weights and serves
garbage. ``inspect_adapter`` reads only the config and the safetensors *header* (a few KB, no
tensor data), so it is cheap enough to run on every load, and it needs no torch.

The safetensors layout is fixed by its specification: an 8-byte little-endian header length,
then a JSON object mapping tensor names to ``{"dtype", "shape", "data_offsets"}``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_LORA_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")


class InvalidAdapterError(ValueError):
    """The folder is not a loadable LoRA adapter; the message says why."""


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    path: Path
    rank: int
    alpha: float
    base_model: str | None  # ``base_model_name_or_path`` as the trainer recorded it
    target_modules: tuple[str, ...]  # module paths that carry LoRA weights
    tensors: int


def inspect_adapter(path: str | Path) -> AdapterInfo:
    """Validate the adapter folder at ``path`` and describe it.

    Raises :class:`InvalidAdapterError` when the folder or a file is missing, the config is not
    a LoRA config, the weights file is not safetensors, or a module's ``lora_A``/``lora_B``
    shapes disagree with each other or with the configured rank.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise InvalidAdapterError(f"No adapter found at {folder}: not a folder")
    config = _read_config(folder / CONFIG_FILE)
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise InvalidAdapterError(f"{CONFIG_FILE}: peft_type is {peft_type}, not LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapterError(f"{CONFIG_FILE}: r must be a positive integer, not {rank!r}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise InvalidAdapterError(f"{CONFIG_FILE}: lora_alpha must be a number, not {alpha!r}")
    patterns: dict[str, Any] = config.get("rank_pattern") or {}

    weights = folder / WEIGHTS_FILE
    header, data_bytes = _read_header(weights)
    ranks: dict[str, dict[str, list[int]]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] <= data_bytes):
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: {name} lies outside the file (truncated?)")
        match = _LORA_TENSOR.match(name)
        if match is None:
            continue
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2):
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: {name} is not a matrix ({shape!r})")
        ranks.setdefault(match["module"], {})[match["side"]] = shape
    if not ranks:
        raise InvalidAdapterError(f"{WEIGHTS_FILE}: no LoRA weights (lora_A/lora_B) in it")

    for module, sides in sorted(ranks.items()):
        if set(sides) != {"A", "B"}:
            raise InvalidAdapterError(f"{WEIGHTS_FILE}: {module} lacks lora_A or lora_B")
        a_rank, b_rank = sides["A"][0], sides["B"][1]
        expected = _expected_rank(module, rank, patterns)
        if a_rank != b_rank or a_rank != expected:
            raise InvalidAdapterError(
                f"{WEIGHTS_FILE}: {module} has rank {a_rank} (lora_A) / {b_rank} (lora_B) but "
                f"{CONFIG_FILE} says r={expected}"
            )
    return AdapterInfo(
        path=folder,
        rank=rank,
        alpha=float(alpha),
        base_model=config.get("base_model_name_or_path"),
        target_modules=tuple(sorted(ranks)),
        tensors=2 * len(ranks),
    )


def _expected_rank(module: str, rank: int, patterns: dict[str, Any]) -> int:
    """PEFT's ``rank_pattern``: a key matches a module whose path ends with it."""
    for pattern, value in patterns.items():
        if re.search(rf"(^|\.){pattern}$", module):
            return int(value)
    return rank


def _read_config(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidAdapterError(f"No adapter found: {file} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{file.name} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{file.name} must hold a JSON object")
    return config


def _read_header(file: Path) -> tuple[dict[str, Any], int]:
    """The header and the number of data bytes after it."""
    try:
        with file.open("rb") as fh:
            size_bytes = fh.read(8)
            if len(size_bytes) != 8:
                raise InvalidAdapterError(f"{file.name} is not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", size_bytes)
            data_bytes = file.stat().st_size - 8 - size
            if size > _MAX_HEADER_BYTES or data_bytes < 0:
                raise InvalidAdapterError(f"{file.name} is not a safetensors file (bad header)")
            header = json.loads(fh.read(size))
    except FileNotFoundError:
        raise InvalidAdapterError(f"No adapter weights: {file} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapterError(f"{file.name} is not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidAdapterError(f"{file.name} is not a safetensors file (bad header)")
    return header, data_bytes

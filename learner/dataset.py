"""Dataset folders: written whole or not at all, read back with their manifest checked."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from learner.batch import Batch
from learner.records import (
    KTO_FILE,
    MANIFEST_FILE,
    PAIRS_FILE,
    DatasetManifest,
    PreferencePairRecord,
    UnpairedRecord,
)


class DatasetError(ValueError):
    """The folder is not a usable dataset (the message says why)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_dataset(
    output: Path, batch: Batch, *, origin: str, settings: dict[str, Any], overwrite: bool = False
) -> DatasetManifest:
    """Write ``batch`` into the folder ``output`` (created; an existing dataset there is only
    replaced with ``overwrite``). Files go to a temporary sibling renamed into place, so an
    interrupted write leaves no half dataset."""
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise DatasetError(f"{output} exists and is not empty (pass --overwrite to replace)")
        if not (output / MANIFEST_FILE).is_file():
            raise DatasetError(f"{output} is not a dataset folder; refusing to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name, records in ((PAIRS_FILE, batch.pairs), (KTO_FILE, batch.unpaired)):
            with (tmp / name).open("w", encoding="utf-8") as fh:
                for record in records:
                    fh.write(record.model_dump_json() + "\n")
        files = {name: _sha256(tmp / name) for name in (PAIRS_FILE, KTO_FILE)}
        sources = [
            {
                "kind": "pair",
                "id": p.id,
                "conversation_id": p.source.conversation_id,
                "feedback_turn": p.source.feedback_turn,
                "response_turn": p.source.response_turn,
                "chosen_turn": p.source.chosen_turn,
                "strategy": p.strategy,
            }
            for p in batch.pairs
        ] + [
            {
                "kind": "kto",
                "id": u.id,
                "conversation_id": u.source.conversation_id,
                "feedback_turn": u.source.feedback_turn,
                "response_turn": u.source.response_turn,
                "label": u.label,
            }
            for u in batch.unpaired
        ]
        manifest = DatasetManifest(
            created_at=datetime.now(UTC).isoformat(),
            origin=origin,
            detector_versions=sorted(
                {e.source.detector_version for e in [*batch.pairs, *batch.unpaired]}
            ),
            pairs=len(batch.pairs),
            unpaired=len(batch.unpaired),
            desirable=sum(1 for u in batch.unpaired if u.label),
            undesirable=sum(1 for u in batch.unpaired if not u.label),
            strategies=dict(Counter(p.strategy for p in batch.pairs)),
            drops=dict(sorted(batch.drops.items())),
            settings=settings,
            sources=sources,
            files=files,
            content_hash=hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        )
        (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(folder: Path) -> DatasetManifest:
    path = folder / MANIFEST_FILE
    try:
        manifest = DatasetManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{folder} is not a dataset: {MANIFEST_FILE} is missing") from None
    except ValueError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    for name, expected in manifest.files.items():
        file = folder / name
        if not file.is_file() or _sha256(file) != expected:
            raise DatasetError(f"{file} is missing or differs from the manifest's hash")
    return manifest


def read_pairs(folder: Path) -> list[PreferencePairRecord]:
    with (folder / PAIRS_FILE).open(encoding="utf-8") as fh:
        return [PreferencePairRecord.model_validate_json(line) for line in fh if line.strip()]


def read_unpaired(folder: Path) -> list[UnpairedRecord]:
    with (folder / KTO_FILE).open(encoding="utf-8") as fh:
        return [UnpairedRecord.model_validate_json(line) for line in fh if line.strip()]

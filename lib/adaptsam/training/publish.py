"""Writing a run's result: adapter files (atomically, by rename) and the stats viewers poll."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Sequence

from ..engine.models import published_name
from ..model import adapter_io
from .data import image_name
from .starting_point import StartingPoint


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _save(model, path: Path, start: StartingPoint, train_items, val_items, metrics, options, seconds) -> Path:
    """The run's adapters with what they learnt from: their own images and, through `start`, the
    file they started from and its lineage."""
    trained = [image_name(d) for d in train_items]
    adapter_io.save_adapters(
        path, model, start.next_version,
        training_images=trained,
        validation_images=[image_name(d) for d in val_items],
        images_seen=sorted(set(start.images_seen) | set(trained)),
        metrics=metrics, options=options, previous_version=start.base_version, train_seconds=round(seconds, 1),
        started_from=dict(start.started_from),
    )
    return path


def save_candidate(model, path: Path, start: StartingPoint, train_items: Sequence[Dict], val_items: Sequence[Dict],
                   metrics: Dict, options: Dict, seconds: float) -> Path:
    """A run's result before the gate: outside the folder the server serves from."""
    return _save(model, Path(path), start, train_items, val_items, metrics, options, seconds)


def publish(model, weights_dir: Path, kind: str, backbone: str, start: StartingPoint, train_items: Sequence[Dict],
            val_items: Sequence[Dict], metrics: Dict, options: Dict, seconds: float) -> Path:
    return _save(model, Path(weights_dir) / published_name(kind, backbone, start.next_version), start, train_items,
                 val_items, metrics, options, seconds)

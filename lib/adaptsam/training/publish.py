"""Writing a run's result: adapter files (atomically, by rename) and the stats viewers poll."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

from ..engine.models import published_name
from ..model import adapter_io
from .data import image_name


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _save(model, path: Path, version: int, train_items, val_items, metrics, options, previous_version, seconds,
          seen_before, started_from) -> Path:
    trained = [image_name(d) for d in train_items]
    adapter_io.save_adapters(
        path, model, version,
        training_images=trained,
        validation_images=[image_name(d) for d in val_items],
        images_seen=sorted(set(seen_before) | set(trained)),
        metrics=metrics, options=options, previous_version=previous_version, train_seconds=round(seconds, 1),
        started_from=dict(started_from or {}),
    )
    return path


def save_candidate(model, path: Path, version: int, train_items: Sequence[Dict], val_items: Sequence[Dict], metrics: Dict,
                   options: Dict, previous_version: int, seconds: float, seen_before: Iterable[str] = (),
                   started_from: Optional[Dict] = None) -> Path:
    """A run's result before the gate: outside the folder the server serves from. `seen_before`:
    the images the weights it started from learnt from (adapter_io.images_seen); `started_from`:
    that file (starting_point.origin)."""
    return _save(model, Path(path), version, train_items, val_items, metrics, options, previous_version, seconds,
                 seen_before, started_from)


def publish(model, weights_dir: Path, kind: str, backbone: str, version: int, train_items: Sequence[Dict],
            val_items: Sequence[Dict], metrics: Dict, options: Dict, previous_version: int, seconds: float,
            seen_before: Iterable[str] = (), started_from: Optional[Dict] = None) -> Path:
    return _save(model, Path(weights_dir) / published_name(kind, backbone, version), version, train_items, val_items,
                 metrics, options, previous_version, seconds, seen_before, started_from)

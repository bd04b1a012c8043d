"""MONAI Label infer tasks `adaptsam` (2D adapters) and `adaptsam_3d` (MA-SAM 3D adapters).

Type `deepgrow`, so Slicer and OHIF show their point tools; dimension 3, so Slicer sends every
click and replaces the whole segment with our result (slice mode returns the session's previous
result with only the prompted slice changed, so nothing the user already has is lost).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ..engine.errors import RequestError
from ..engine.interactive import InteractiveSegmenter, SegmentRequest, parse_axis
from .writer import write_label

MODES = ("volume", "slice")


SUFFIXES = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha")


def _split_name(path: str) -> Tuple[str, str]:
    """(image id, extension) of a datastore file: MONAI Label ids are names minus extension."""
    name = Path(path).name
    for ext in SUFFIXES:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return name, ".nii.gz"


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _points(value, name: str):
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError(f"{name} must be a list of [i, j, k] voxel indices")
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{name} must be a list of [i, j, k] voxel indices")
    return value


class AdaptSamInfer(InferTask):
    def __init__(self, kind: str, labels: List[str], segmenter: Callable[[], InteractiveSegmenter], propagate: bool):
        self.kind = kind
        self._segmenter = segmenter
        what = "2D adapters (Medical SAM Adapter), slice by slice" if kind == "2d" else "3D adapters (MA-SAM) over 5 adjacent slices"
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=3,
            description=f"Adapted SAM with {what}: box (roi), +/- clicks and mask prompts; "
            "propagates through adjacent slices in volume mode",
            config={
                "mode": list(MODES) if propagate else list(reversed(MODES)),
                "axis": ["axial", "coronal", "sagittal"],
                "reset_state": False,
            },
        )

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Dict) -> Tuple[str, Dict]:
        label = request.get("label")
        mask_path = request.get("mask_prompt")
        # MONAI Label's stock endpoint puts an uploaded label file under "label", where Slicer
        # also sends the segment name; a value naming an existing file is the mask prompt.
        if isinstance(label, str) and label and Path(label).is_file():
            mask_path, label = label, None
        if label is not None and label != "" and label not in self.labels:
            raise RequestError(f"unknown label {label!r}; this model knows {sorted(self.labels)}")
        mode = request.get("mode", MODES[0] if self._segmenter().propagate_enabled else "slice")
        if isinstance(mode, list):  # a client echoing the option list back
            mode = mode[0]
        seg_request = SegmentRequest(
            image_path=request["image"],
            image_id=_split_name(request["image"])[0],
            label=label or None,
            foreground=_points(request.get("foreground"), "foreground"),
            background=_points(request.get("background"), "background"),
            roi=request.get("roi") or None,
            mask_path=mask_path,
            mode=mode,
            axis=parse_axis(request.get("axis") if not isinstance(request.get("axis"), list) else None),
            slice_index=request.get("slice"),
            client_id=str(request.get("client_id") or "default"),
            reset=_bool(request.get("reset_state", False)),
        )
        result = self._segmenter().segment(seg_request)
        ext = request.get("result_extension") or _split_name(request["image"])[1]
        t = time.perf_counter()
        path = write_label(result.label, result.affine, ext)
        result.timings["write"] = round((time.perf_counter() - t) * 1000, 1)
        name = label or (self.labels[0] if len(self.labels) == 1 else "segment")
        return path, {
            "label_names": {name: 1},
            "model": result.model,
            "adapter_kind": self.kind,
            "adapter_version": result.adapter_version,
            "prompted_slice": result.prompted_slice,
            "slice_iou": {str(k): v for k, v in result.slice_iou.items()},
            "embedding_cached": result.embedding_cached,
            "timings_ms": result.timings,
        }


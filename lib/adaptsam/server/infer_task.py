"""MONAI Label infer tasks `adaptsam` (2D adapters) and `adaptsam_3d` (MA-SAM 3D adapters).

Type `deepgrow`, so Slicer and OHIF show their point tools; dimension 3, so Slicer sends every
click and replaces the whole segment with our result (slice mode returns the session's previous
result with only the prompted slice changed, so nothing the user already has is lost). The
model is class-agnostic: `label` may name any structure; the configured names are what viewers
are offered, and a known name also chooses a CT window preset.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from ..engine.errors import RequestError
from ..engine.interactive import InteractiveSegmenter
from ..engine.request import MODES, SegmentRequest, parse_axis, parse_bool, parse_mode
from .writer import RESULT_EXTENSIONS, write_label

IMAGE_SUFFIXES = (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha")
# what a request's params may hold: the prompts and options read below, and what Slicer and
# OHIF add to every request (output format, their copy of the model's option table)
PARAMS = ("foreground", "background", "roi", "label", "mode", "axis", "slice", "client_id", "reset_state",
          "result_extension", "result_dtype", "result_compress", "restore_label_idx", "device", "description")


def split_name(path: str) -> Tuple[str, str]:
    """(image id, extension) of a datastore file: MONAI Label ids are names minus extension."""
    name = Path(path).name
    for ext in IMAGE_SUFFIXES:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return name, ".nii.gz"


def _points(value, name: str):
    if isinstance(value, str) and value:
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError(f"{name} must be a list of [i, j, k] voxel indices")
    return value


def structure_name(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 128 or any(ord(ch) < 32 for ch in value):
        raise RequestError(f"label must be a structure name (text, at most 128 characters), got {value!r}")
    return value.strip()


class AdaptSamInfer(InferTask):
    def __init__(self, kind: str, labels: List[str], segmenter: Callable[[], InteractiveSegmenter], propagate: bool):
        self.kind = kind
        self._segmenter = segmenter
        self.default_mode = MODES[0] if propagate else "slice"
        what = "2D adapters (Medical SAM Adapter), slice by slice" if kind == "2d" else "3D adapters (MA-SAM) over 5 adjacent slices"
        super().__init__(
            type=InferType.DEEPGROW,
            labels=labels,
            dimension=3,
            description=f"Adapted SAM with {what}: box (roi), +/- clicks and mask prompts on any structure; "
            "propagates through adjacent slices in volume mode",
            config={
                "mode": [self.default_mode] + [m for m in MODES if m != self.default_mode],
                "axis": ["axial", "coronal", "sagittal"],
                "reset_state": False,
            },
        )

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Dict) -> Tuple[str, Dict]:
        label = structure_name(request.get("label"))
        ext = request.get("result_extension") or split_name(request["image"])[1]
        ext = ext if not isinstance(ext, str) or ext.startswith(".") else "." + ext
        if ext not in RESULT_EXTENSIONS:
            raise RequestError(f"result_extension must be one of {list(RESULT_EXTENSIONS)}, got {ext!r}")
        seg_request = SegmentRequest(
            image_path=request["image"],
            image_id=split_name(request["image"])[0],
            label=label or None,
            foreground=_points(request.get("foreground"), "foreground"),
            background=_points(request.get("background"), "background"),
            roi=request.get("roi") or None,
            mask_path=request.get("mask_prompt"),
            mode=parse_mode(request.get("mode"), self.default_mode),
            axis=parse_axis(request.get("axis")),
            slice_index=request.get("slice"),
            client_id=str(request.get("client_id") or "default"),
            reset=parse_bool(request.get("reset_state", False), "reset_state"),
        )
        result = self._segmenter().segment(seg_request)
        t = time.perf_counter()
        path = write_label(result.label, result.affine, ext)
        result.timings["write"] = round((time.perf_counter() - t) * 1000, 1)
        return path, {
            "label_names": {label or "segment": 1},
            "model": result.model,
            "adapter_kind": self.kind,
            "adapter_version": result.adapter_version,
            "prompted_slice": result.prompted_slice,
            "slice_iou": {str(k): v for k, v in result.slice_iou.items()},
            "embedding_cached": result.embedding_cached,
            "timings_ms": result.timings,
        }

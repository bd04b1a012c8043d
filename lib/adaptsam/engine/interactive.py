"""One interactive request: prompts in voxel indices -> a label volume.

The flow: validate everything first (a bad request costs nothing and changes nothing), take the
prompted slice's embedding from the cache (or encode that one slice), decode, schedule the rest
of the volume for background encoding, then (volume mode) propagate slice by slice: each next
slice is prompted with the previous slice's box and logits, until the predicted IoU or the mask
area drops, or the 3D box ends.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .allocator import keep_freed_memory
from .cache import EmbeddingCache
from .click_carving import carve_clicks
from .encoder import SliceEncoder
from .errors import RequestError
from .first_click import answer_lone_click
from .guide_box import guide_box
from .metrics import bounding_box
from .models import ModelHandle, ServingModel
from .predictor import Prediction, SlicePredictor
from .preprocess import in_plane_axes, put_slice, take_slice, voxel_to_plane
from .sessions import SessionStore
from .volume import ImageLoadError, Volume

AXES = {"axial": 2, "coronal": 1, "sagittal": 0}


@dataclass
class PropagationPolicy:
    # stop when the decoder's own IoU estimate falls below this. 0.4 rather than 0.5: with v4 the
    # estimate runs low on thin structures (the spinal cord's prompted slice: 0.60, the next ones
    # under 0.5 with Dice 0.5-0.6); on the dev set 0.4 gave 3D 0.452 -> 0.481, 2D 0.334 -> 0.343
    # volume Dice, 0.3 no better (README: Measured)
    min_iou: float = 0.4
    min_area_fraction: float = 0.1  # ... or the mask shrinks below this fraction of the prompted slice's
    use_logits: bool = True  # feed the previous slice's logits as the next mask prompt


@dataclass
class SegmentRequest:
    image_path: str
    image_id: str
    label: Optional[str] = None
    foreground: Sequence[Sequence[int]] = ()
    background: Sequence[Sequence[int]] = ()
    roi: Optional[Sequence[float]] = None
    mask_path: Optional[str] = None
    mode: str = "volume"
    axis: int = 2
    slice_index: Optional[int] = None
    client_id: str = "default"
    reset: bool = False


@dataclass
class SegmentResult:
    label: np.ndarray  # uint8, the image's shape
    affine: np.ndarray
    prompted_slice: int
    slice_iou: Dict[int, float]
    model: str
    adapter_version: int
    embedding_cached: bool
    timings: Dict[str, float] = field(default_factory=dict)


class VolumeStore:
    """The last few loaded volumes (and their normalised copies), keyed by path and mtime."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._items: "OrderedDict[Tuple[str, int], Tuple[Volume, str]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, image_id: str) -> Tuple[Volume, str]:
        """(volume, image key "<id>@<content hash>")."""
        p = Path(path)
        if not p.exists():
            raise RequestError(f"image {image_id!r} not found")
        key = (str(p), p.stat().st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        try:
            vol = Volume.load(p)
        except ImageLoadError as e:
            raise RequestError(str(e)) from e
        entry = (vol, f"{image_id}@{vol.content_hash()}")
        with self._lock:
            self._items[key] = entry
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return entry


class Runtime:
    """What every model and client shares: embedding cache, background encoder, sessions, volumes."""

    def __init__(self, cache_bytes: int):
        keep_freed_memory()  # requests decode in worker threads: see allocator.py
        self.cache = EmbeddingCache(cache_bytes)
        self.encoder = SliceEncoder(self.cache)
        self.sessions = SessionStore()
        self.volumes = VolumeStore()
        self.handles: Dict[str, ModelHandle] = {}
        self._served: Dict[str, str] = {}  # handle kind -> model key last served
        self._lock = threading.Lock()

    def serving(self, handle: ModelHandle) -> ServingModel:
        """The handle's current model; on a version change, old embeddings are dropped and the
        volumes being worked on are re-encoded with the new model in the background."""
        serving = handle.current()
        with self._lock:
            old = self._served.get(handle.kind)
            self._served[handle.kind] = serving.key
            if old is None or old == serving.key:
                return serving
            still_used = set(self._served.values())
        if old not in still_used:
            jobs = self.encoder.forget_model(old)
            self.cache.drop_where(lambda k: k.model == old)
            for job in jobs:  # recompute what users were working on, with the new model
                self.encoder.schedule(serving, job.volume, job.image, job.axis, job.window, job.order[0])
        return serving


def _parse_clicks(name: str, clicks, shape) -> List[Tuple[int, int, int]]:
    out = []
    for c in clicks or []:
        try:
            v = tuple(int(round(float(x))) for x in c)
        except (TypeError, ValueError):
            raise RequestError(f"{name} click {c!r} is not three numbers [i, j, k]")
        if len(v) != 3:
            raise RequestError(f"{name} click {list(c)!r} must have three indices [i, j, k]")
        if any(x < 0 or x >= s for x, s in zip(v, shape)):
            raise RequestError(f"{name} click {list(v)} is outside the image (shape {list(shape)})")
        out.append(v)
    return out


def _parse_roi(roi, shape) -> Optional[List[Tuple[int, int]]]:
    """Slicer's [i0, i1, j0, j1, k0, k1] -> per-axis inclusive (lo, hi), clipped to the image.

    Each pair may come in either order: Slicer derives it from the ROI's RAS corners, so on
    LPS-stored volumes i0 > i1 is normal. Degenerate or outside boxes are refused.
    """
    if roi is None or (isinstance(roi, (list, tuple)) and len(roi) == 0):
        return None
    try:
        vals = [int(round(float(x))) for x in roi]
    except (TypeError, ValueError):
        raise RequestError(f"roi {roi!r} must be six numbers [i0, i1, j0, j1, k0, k1]")
    if len(vals) != 6:
        raise RequestError(f"roi {roi!r} must be six numbers [i0, i1, j0, j1, k0, k1]")
    ranges = []
    for axis in range(3):
        lo, hi = sorted(vals[2 * axis : 2 * axis + 2])
        if hi < 0 or lo >= shape[axis]:
            raise RequestError(f"roi {vals} lies outside the image (shape {list(shape)})")
        ranges.append((max(lo, 0), min(hi, shape[axis] - 1)))
    return ranges


class InteractiveSegmenter:
    def __init__(self, runtime: Runtime, handle: ModelHandle, policy: Optional[PropagationPolicy] = None, propagate: bool = True,
                 carry_logits: Optional[bool] = None, guide_corrections: bool = True, carve_clicks: bool = True,
                 first_click_boxes: bool = True):
        self.runtime = runtime
        self.handle = handle
        self.policy = policy or PropagationPolicy()
        self.propagate_enabled = propagate
        # a session's next click also gets its last logits as mask prompt; None: as the served
        # model was trained (ServingModel.carries_logits)
        self.carry_logits = carry_logits
        # a session's next click on a slice it already answered also sends the guide box
        # (guide_box.py) unless the request has its own box or mask
        self.guide_corrections = guide_corrections
        # ... and the slice's clicks are painted into the carried logits (click_carving.py)
        self.carve_clicks = carve_clicks
        # an adapter's answer to a lone first click is chosen among boxes around it (first_click.py)
        self.first_click_boxes = first_click_boxes
        runtime.handles[handle.kind] = handle

    def carries_logits(self, serving: ServingModel) -> bool:
        return serving.carries_logits if self.carry_logits is None else self.carry_logits

    def segment(self, req: SegmentRequest) -> SegmentResult:
        t0 = time.perf_counter()
        timings: Dict[str, float] = {}
        if req.mode not in ("slice", "volume"):
            raise RequestError(f"mode must be 'slice' or 'volume', got {req.mode!r}")
        if req.axis not in (0, 1, 2):
            raise RequestError(f"axis must be 0, 1, 2 or axial/coronal/sagittal, got {req.axis!r}")
        vol, image_key = self.runtime.volumes.get(req.image_path, req.image_id)
        shape = vol.shape
        fg = _parse_clicks("foreground", req.foreground, shape)
        bg = _parse_clicks("background", req.background, shape)
        roi = _parse_roi(req.roi, shape)
        mask = self._load_mask(req.mask_path, shape) if req.mask_path else None
        if not fg and not bg and roi is None and mask is None:
            raise RequestError("no prompt: send foreground/background clicks, a roi, or a label mask")
        axis = req.axis
        row_axis, col_axis = in_plane_axes(axis)
        if roi is not None and (roi[row_axis][0] == roi[row_axis][1] or roi[col_axis][0] == roi[col_axis][1]):
            raise RequestError(f"roi {list(req.roi)} is empty in the slice plane")
        k = self._prompted_slice(req, fg, bg, roi, mask, axis, shape)
        timings["load"] = time.perf_counter() - t0

        serving = self.runtime.serving(self.handle)
        window = vol.window(req.label)
        encoder = self.runtime.encoder
        with encoder.foreground():
            t = time.perf_counter()
            emb, cached = encoder.embedding(serving, vol, image_key, axis, k, window)
            timings["encode"] = time.perf_counter() - t
            encoder.schedule(serving, vol, image_key, axis, window, k)

            session_label = req.label or ""
            sessions = self.runtime.sessions
            fgs, bgs = set(fg), set(bg)
            session = sessions.get(req.client_id, req.image_id, session_label, serving.key)
            continuing = not req.reset and session.continues_with(fgs, bgs) and session.result is not None
            if not continuing:
                session = sessions.reset(req.client_id, req.image_id, session_label, serving.key)

            predictor = SlicePredictor(serving.model, next(serving.model.parameters()).device)
            geom = encoder.geometry(serving, vol, axis)
            clicks = self._clicks_by_slice(fg, bg, axis)
            t = time.perf_counter()
            # the session's last answer on this slice: mask prompt and guide box of a correction
            previous = session.logits.get((axis, k)) if continuing else None
            kfg, kbg = clicks.get(k, ([], []))
            mask_in = self._mask_prompt(mask, axis, k, geom, serving)
            if mask_in is None and previous is not None and self.carries_logits(serving):
                mask_in = carve_clicks(previous, geom, kfg, kbg) if self.carve_clicks else previous
            box = self._box(roi, axis) if roi is not None and roi[axis][0] <= k <= roi[axis][1] else None
            if box is None and mask is not None and not clicks.get(k):
                box = bounding_box(take_slice(mask, axis, k))
            if box is None and mask is None and previous is not None and self.guide_corrections and (kfg or kbg):
                box = guide_box((geom.logits_to_plane(previous[0, 0]) > 0).cpu().numpy(), kfg)
            # a lone click: the base model picks among SAM's three ambiguity masks; adapters learnt
            # (and were measured) on the single output and answer through boxes around it instead
            single_click = box is None and mask_in is None and len(kfg) + len(kbg) == 1
            if single_click and kfg and serving.version > 0 and self.first_click_boxes:
                pred = answer_lone_click(predictor, emb, geom, kfg[0])
            else:
                pred = predictor.predict(emb, geom, box=box, foreground=kfg, background=kbg, mask_input=mask_in,
                                         multimask=single_click and serving.version == 0)
            timings["decode"] = time.perf_counter() - t
            preds = {k: pred}

            t = time.perf_counter()
            if req.mode == "volume" and self.propagate_enabled:
                preds.update(self._propagate(serving, vol, image_key, window, axis, k, pred, roi, clicks, mask, geom, predictor))
            timings["propagate"] = time.perf_counter() - t

        label = self._assemble(preds, roi, axis, shape, session.result if (continuing and req.mode == "slice") else None)
        session.foreground, session.background = fgs, bgs
        session.logits[(axis, k)] = pred.low_res_logits
        session.result = label
        session.prompts = {
            "foreground": [list(c) for c in fg], "background": [list(c) for c in bg],
            "roi": [list(r) for r in roi] if roi is not None else None, "label": req.label,
            "mode": req.mode, "axis": axis, "model": serving.key, "ts": time.time(),
        }
        timings["total"] = time.perf_counter() - t0
        return SegmentResult(
            label=label,
            affine=vol.affine,
            prompted_slice=k,
            slice_iou={int(s): round(p.iou, 4) for s, p in sorted(preds.items())},
            model=serving.key,
            adapter_version=serving.version,
            embedding_cached=cached,
            timings={k2: round(v * 1000, 1) for k2, v in timings.items()},
        )

    # ---- pieces ---------------------------------------------------------------------------

    @staticmethod
    def _load_mask(path: str, shape) -> np.ndarray:
        try:
            mvol = Volume.load(path, modality="MR")
        except ImageLoadError as e:
            raise RequestError(f"uploaded label mask is not a readable image: {e}") from e
        if mvol.shape != tuple(shape):
            raise RequestError(f"uploaded label mask has shape {list(mvol.shape)}, the image has {list(shape)}")
        return mvol.array > 0

    @staticmethod
    def _prompted_slice(req, fg, bg, roi, mask, axis, shape) -> int:
        depth = shape[axis]
        if req.slice_index is not None:
            try:
                k = int(req.slice_index)
            except (TypeError, ValueError):
                raise RequestError(f"slice {req.slice_index!r} is not an integer")
            if not 0 <= k < depth:
                raise RequestError(f"slice {k} is outside the image ({depth} slices along axis {axis})")
            return k
        if roi is not None:
            lo, hi = roi[axis]
            return (lo + hi) // 2
        if fg:
            return fg[-1][axis]
        if bg:
            return bg[-1][axis]
        other = tuple(d for d in range(3) if d != axis)
        areas = mask.sum(axis=other)
        if areas.max() == 0:
            raise RequestError("the uploaded label mask is empty")
        return int(areas.argmax())

    @staticmethod
    def _clicks_by_slice(fg, bg, axis) -> Dict[int, Tuple[List, List]]:
        out: Dict[int, Tuple[List, List]] = {}
        for clicks, which in ((fg, 0), (bg, 1)):
            for c in clicks:
                s, r, col = voxel_to_plane(c, axis)
                out.setdefault(s, ([], []))[which].append((r, col))
        return out

    @staticmethod
    def _box(roi, axis) -> Tuple[int, int, int, int]:
        r, c = in_plane_axes(axis)
        return (roi[r][0], roi[c][0], roi[r][1], roi[c][1])

    @staticmethod
    def _mask_prompt(mask, axis, s, geom, serving) -> Optional[torch.Tensor]:
        """A binary mask slice as SAM's dense prompt: low-res logits of +-8."""
        if mask is None:
            return None
        plane = take_slice(mask, axis, s)
        if not plane.any():
            return None
        low = geom.mask_to_model(torch.from_numpy(plane.astype(np.float32)), serving.model.mask_input_size[0])
        return (low * 2.0 - 1.0) * 8.0

    def _propagate(self, serving, vol, image_key, window, axis, k, start: Prediction, roi, clicks, mask, geom, predictor) -> Dict[int, Prediction]:
        depth = vol.shape[axis]
        lo, hi = roi[axis] if roi is not None and roi[axis][0] < roi[axis][1] else (0, depth - 1)
        start_area = max(int(start.mask.sum()), 1)
        clip = self._box(roi, axis) if roi is not None else None
        out: Dict[int, Prediction] = {}
        for step in (1, -1):
            prev = start
            s = k + step
            while lo <= s <= hi:
                box = bounding_box(prev.mask)
                if box is None:
                    break
                if clip is not None:
                    box = (max(box[0], clip[0]), max(box[1], clip[1]), min(box[2], clip[2]), min(box[3], clip[3]))
                    if box[0] > box[2] or box[1] > box[3]:
                        break
                emb, _ = self.runtime.encoder.embedding(serving, vol, image_key, axis, s, window)
                mask_in = self._mask_prompt(mask, axis, s, geom, serving)
                if mask_in is None and self.policy.use_logits:
                    mask_in = prev.low_res_logits
                sfg, sbg = clicks.get(s, ([], []))
                pred = predictor.predict(emb, geom, box=box, foreground=sfg, background=sbg, mask_input=mask_in)
                area = int(pred.mask.sum())
                if area == 0 or pred.iou < self.policy.min_iou:
                    break
                if roi is None and area < self.policy.min_area_fraction * start_area:
                    break
                out[s] = pred
                prev = pred
                s += step
        return out

    @staticmethod
    def _assemble(preds: Dict[int, Prediction], roi, axis, shape, previous: Optional[np.ndarray]) -> np.ndarray:
        # Slice mode edits the session's previous result in place: a copy of a 512x512xN volume
        # costs more than the decoder on this kind of machine (fresh pages fault one by one).
        # Fortran order makes the (i, j, k) volume's transpose - what ITK writers take - free,
        # and an axial slice contiguous.
        if previous is not None and previous.shape == tuple(shape):
            label = np.asfortranarray(previous)  # no copy: it was allocated here
        else:
            label = np.zeros(shape, np.uint8, order="F")
        r, c = in_plane_axes(axis)
        for s, p in preds.items():
            plane = p.mask.astype(np.uint8)
            if roi is not None:  # a 3D box bounds the result in-plane too
                keep = np.zeros_like(plane)
                keep[roi[r][0] : roi[r][1] + 1, roi[c][0] : roi[c][1] + 1] = 1
                plane &= keep
            put_slice(label, axis, s, plane)
        return label


def parse_axis(value) -> int:
    if value is None or value == "":
        return 2
    if isinstance(value, str) and value.lower() in AXES:
        return AXES[value.lower()]
    try:
        return int(value)
    except (TypeError, ValueError):
        raise RequestError(f"axis must be 0, 1, 2 or axial/coronal/sagittal, got {value!r}")

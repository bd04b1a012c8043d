"""One interactive request: prompts in voxel indices -> a label volume. Orchestration only.

Validate everything first (request.py), take the prompted slice's embedding from the cache (or
encode that slice), let the session say what it continues from (sessions.py: its last answer on
that slice, prompted or propagated, is the correction's starting point), decode the slice with
the one prompt recipe (prompts.py; negative clicks alone on a slice: rejection.py; a correction
that grew the answer carries to the neighbouring slices: carry.py), schedule the rest of the
volume for background encoding, propagate in volume mode (propagation.py), and record the
answer in the session.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .allocator import keep_freed_memory
from .cache import EmbeddingCache
from .carry import CarryPolicy, carry_growth
from .encoder import SliceEncoder
from .errors import RequestError
from .models import ModelHandle, ServingModel
from .predictor import Prediction
from .preprocess import in_plane_axes, put_slice, take_slice, voxel_to_plane
from .prompts import SERVED, PromptPolicy, SlicePrompt, decode_slice
from .propagation import PropagationPolicy, propagate
from .rejection import drop_rejected, empty_answers, main_region_rejected, slices_after_rejection
from .request import SegmentRequest, parse_clicks, parse_roi, parse_slice
from .sessions import SessionStore
from .uploads import HEADER_ROOM, check_inflated_size, header_shape
from .volume import ImageLoadError, Volume, VolumeStore


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


class Runtime:
    """What every model and client shares: embedding cache, background encoder, sessions, volumes."""

    def __init__(self, cache_bytes: int, session_bytes: int = 1 << 30):
        keep_freed_memory()  # requests decode in worker threads: see allocator.py
        self.cache = EmbeddingCache(cache_bytes)
        self.encoder = SliceEncoder(self.cache)
        self.sessions = SessionStore(session_bytes)
        self.volumes = VolumeStore()
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

    def stop(self) -> None:
        self.encoder.stop()


class InteractiveSegmenter:
    def __init__(self, runtime: Runtime, handle: ModelHandle, policy: PromptPolicy = SERVED,
                 propagation: PropagationPolicy = PropagationPolicy(), propagate: bool = True,
                 carry: CarryPolicy = CarryPolicy()):
        self.runtime = runtime
        self.carry = carry
        self.handle = handle
        self.policy = policy
        self.propagation = propagation
        self.propagate_enabled = propagate

    def segment(self, req: SegmentRequest) -> SegmentResult:
        t0 = time.perf_counter()
        timings: Dict[str, float] = {}
        if req.mode not in ("slice", "volume"):
            raise RequestError(f"mode must be 'slice' or 'volume', got {req.mode!r}")
        if req.axis not in (0, 1, 2):
            raise RequestError(f"axis must be 0, 1 or 2, got {req.axis!r}")
        vol, image_key = self.runtime.volumes.get(req.image_path, req.image_id)
        shape, axis = vol.shape, req.axis
        fg = parse_clicks("foreground", req.foreground, shape)
        bg = parse_clicks("background", req.background, shape)
        roi = parse_roi(req.roi, shape)
        mask = load_mask(req.mask_path, shape) if req.mask_path else None
        if not fg and not bg and roi is None and mask is None:
            raise RequestError("no prompt: send foreground/background clicks, a roi, or a label mask")
        if roi is not None and any(lo == hi for lo, hi in (roi[a] for a in in_plane_axes(axis))):
            raise RequestError(f"roi {list(req.roi)} is empty in the slice plane")
        k = prompted_slice(req, fg, bg, roi, mask, axis, shape)
        timings["load"] = time.perf_counter() - t0

        serving = self.runtime.serving(self.handle)
        window = vol.window(req.label)
        encoder = self.runtime.encoder
        # the weights, not the engine: a user's session goes on when the converted encoder takes over
        session = self.runtime.sessions.get(req.client_id, req.image_id, req.label or "", serving.version_key)
        with encoder.foreground(), session.lock:
            t = time.perf_counter()
            emb, cached = encoder.embedding(serving, vol, image_key, axis, k, window)
            timings["encode"] = time.perf_counter() - t
            encoder.schedule(serving, vol, image_key, axis, window, k)

            continuing = session.begin(fg, bg, roi, req.reset)
            geom = encoder.geometry(serving, vol, axis)
            clicks = clicks_by_slice(fg, bg, axis)
            kfg, kbg = clicks.get(k, ([], []))
            t = time.perf_counter()
            prompt = SlicePrompt(
                foreground=kfg, background=kbg,
                box=plane_box(roi, axis) if roi is not None and roi[axis][0] <= k <= roi[axis][1] else None,
                mask=take_slice(mask, axis, k) if mask is not None else None,
                previous=session.previous_logits((axis, k)) if continuing else None,
            )
            pred = decode_slice(serving, emb, geom, prompt, self.policy)
            # negative clicks alone on a slice of an answer without a 3D box (rejection.py)
            rejecting = bool(req.mode == "slice" and prompt.previous is not None and kbg and not kfg and roi is None and mask is None)
            if rejecting:
                pred = drop_rejected(pred, kbg, geom)
            timings["decode"] = time.perf_counter() - t
            preds = {k: pred}
            if rejecting and main_region_rejected(prompt.previous_mask(geom), pred.mask, kbg):
                cut = slices_after_rejection(k, shape[axis], [c[axis] for c in fg], clicks)
                preds.update(empty_answers(cut, pred.mask.shape, pred.low_res_logits.shape[-1]))

            t = time.perf_counter()
            embed = lambda s, step: encoder.embedding(serving, vol, image_key, axis, s, window, ahead=step)[0]
            if (req.mode == "slice" and continuing and kfg and mask is None and session.result is not None
                    and session.result.shape == tuple(shape)):
                bounds = roi[axis] if roi is not None else (0, shape[axis] - 1)
                preds.update(carry_growth(serving, embed, geom, session.result, axis, k, pred, bounds, set(clicks), self.carry))

            if req.mode == "volume" and self.propagate_enabled:
                if roi is not None:  # a 3D box names the slices it needs: encode them first, in batches
                    lo, hi = roi[axis]
                    encoder.prefetch(serving, vol, image_key, axis, sorted(range(lo, hi + 1), key=lambda s: abs(s - k)), window)
                    timings["encode"] += time.perf_counter() - t
                    t = time.perf_counter()
                preds.update(propagate(serving, embed, geom, shape[axis], k, pred, roi, axis, lambda r: plane_box(r, axis),
                                       clicks, mask, self.propagation))
            timings["propagate"] = time.perf_counter() - t

            editing = req.mode == "slice" and session.result is not None and session.result.shape == tuple(shape)
            replaced = {(axis, s): take_slice(session.result, axis, s).copy() for s in preds} if editing else None
            label = assemble(preds, roi, axis, shape, session.result if req.mode == "slice" else None)
            answered = {(axis, s): p.low_res_logits for s, p in preds.items()}
            session.record(fg, bg, roi, answered, label, {
                "foreground": [list(c) for c in fg], "background": [list(c) for c in bg],
                "roi": [list(r) for r in roi] if roi is not None else None, "label": req.label,
                "mode": req.mode, "axis": axis, "model": serving.key, "ts": time.time(),
            }, replaces_all=req.mode == "volume", planes_before=replaced)
        self.runtime.sessions.commit(session)
        timings["total"] = time.perf_counter() - t0
        return SegmentResult(
            label=label, affine=vol.affine, prompted_slice=k,
            slice_iou={int(s): round(p.iou, 4) for s, p in sorted(preds.items())},
            model=serving.key, adapter_version=serving.version, embedding_cached=cached,
            timings={name: round(v * 1000, 1) for name, v in timings.items()},
        )


# ---- pieces ------------------------------------------------------------------------------------

def load_mask(path: str, shape) -> np.ndarray:
    # an upload: its inflated size and grid are checked before it is read whole
    check_inflated_size(path, int(np.prod(shape)) * 8 + HEADER_ROOM)
    grid = header_shape(path)
    if grid != tuple(shape):
        raise RequestError(f"uploaded label mask has shape {list(grid)}, the image has {list(shape)}", status_code=422)
    try:
        mvol = Volume.load(path, modality="MR")
    except ImageLoadError as e:
        raise RequestError(f"uploaded label mask is not a readable image: {e}", status_code=422) from e
    if mvol.shape != tuple(shape):
        raise RequestError(f"uploaded label mask has shape {list(mvol.shape)}, the image has {list(shape)}", status_code=422)
    return mvol.array > 0


def prompted_slice(req: SegmentRequest, fg, bg, roi, mask, axis: int, shape) -> int:
    k = parse_slice(req.slice_index, shape[axis], axis)
    if k is not None:
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


def clicks_by_slice(fg, bg, axis: int) -> Dict[int, Tuple[List, List]]:
    out: Dict[int, Tuple[List, List]] = {}
    for clicks, which in ((fg, 0), (bg, 1)):
        for c in clicks:
            s, r, col = voxel_to_plane(c, axis)
            out.setdefault(s, ([], []))[which].append((r, col))
    return out


def plane_box(roi, axis: int) -> Tuple[int, int, int, int]:
    """The roi's extent in the plane of slices normal to `axis`, as (r0, c0, r1, c1)."""
    r, c = in_plane_axes(axis)
    return (roi[r][0], roi[c][0], roi[r][1], roi[c][1])


def assemble(preds: Dict[int, Prediction], roi, axis: int, shape, previous: Optional[np.ndarray]) -> np.ndarray:
    # Slice mode edits the session's previous result in place: a copy of a 512x512xN volume
    # costs more than the decoder on a CPU (fresh pages fault one by one). Fortran order makes
    # the (i, j, k) volume's transpose - what ITK writers take - free, and an axial slice contiguous.
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

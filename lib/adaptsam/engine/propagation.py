"""3D by propagation: from the prompted slice both ways, each next slice prompted with the
previous slice's answer (its bounding box and its logits as mask prompt), until the decoder's
own IoU estimate or the mask's area says the object has ended, or the 3D box ends. A slice is
answered by the decoder that answered the start (a box alone: see prompts.py)
unless the user clicked or drew on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .metrics import bounding_box
from .models import ServingModel
from .predictor import Prediction, SlicePredictor
from .preprocess import SliceGeometry, take_slice
from .prompts import mask_to_prompt


@dataclass(frozen=True)
class PropagationPolicy:
    # below this predicted IoU the object is taken to have ended; the estimate runs low on thin
    # structures, hence not 0.5 (docs/experiments.md)
    min_iou: float = 0.4
    min_area_fraction: float = 0.1  # ... or (no 3D box) the mask shrinks below this share of the start's
    use_logits: bool = True  # the previous slice's logits are the next slice's mask prompt


Clicks = Dict[int, Tuple[List, List]]  # slice -> (foreground, background) as (row, col)


Step = Callable[[int, int, Prediction, Tuple[int, int, int, int]], Optional[Prediction]]


def walk(start_slice: int, start: Prediction, bounds: Tuple[int, int], step_to: Step) -> Dict[int, Prediction]:
    """From `start_slice` both ways through the slices in `bounds` (inclusive), each slice answered
    by `step_to(s, step, previous answer, its box)`; a direction ends at the first slice it
    answers None for, or where the previous answer is empty. Propagation and carrying a
    correction (carry.py) walk this way and differ only in what they ask and accept."""
    out: Dict[int, Prediction] = {}
    for step in (1, -1):
        prev, s = start, start_slice + step
        while bounds[0] <= s <= bounds[1]:
            box = bounding_box(prev.mask)
            pred = step_to(s, step, prev, box) if box is not None else None
            if pred is None:
                break
            out[s] = pred
            prev, s = pred, s + step
    return out


def propagate(serving: ServingModel, embed: Callable[[int, int], torch.Tensor], geom: SliceGeometry, depth: int,
              start_slice: int, start: Prediction, roi, axis: int, box_of: Callable, clicks: Clicks,
              mask: Optional[np.ndarray] = None, policy: PropagationPolicy = PropagationPolicy()) -> Dict[int, Prediction]:
    """Answers for the slices beyond `start_slice`; `embed(s, step)` gives slice s's embedding
    (`step`: the direction of travel, so the encoder can batch the slices ahead)."""
    model = serving.model
    predictor = SlicePredictor(model, next(model.parameters()).device)
    bounds = roi[axis] if roi is not None and roi[axis][0] < roi[axis][1] else (0, depth - 1)
    start_area = max(int(start.mask.sum()), 1)
    clip = box_of(roi) if roi is not None else None

    def step_to(s: int, step: int, prev: Prediction, box) -> Optional[Prediction]:
        if clip is not None:
            box = (max(box[0], clip[0]), max(box[1], clip[1]), min(box[2], clip[2]), min(box[3], clip[3]))
            if box[0] > box[2] or box[1] > box[3]:
                return None
        drawn = mask_to_prompt(take_slice(mask, axis, s), geom, model.mask_input_size[0]) if mask is not None else None
        mask_in = prev.low_res_logits if drawn is None and policy.use_logits else drawn
        fg, bg = clicks.get(s, ([], []))
        pred = predictor.predict(embed(s, step), geom, box=box, foreground=fg, background=bg, mask_input=mask_in,
                                 adapted_decoder=start.adapted_decoder or bool(fg or bg) or drawn is not None)
        area = int(pred.mask.sum())
        if area == 0 or pred.iou < policy.min_iou:
            return None
        if roi is None and area < policy.min_area_fraction * start_area:
            return None
        return pred

    return walk(start_slice, start, bounds, step_to)

"""A correction that grows the answer on its slice grows it on the neighbouring slices too.

In slice mode a correction changes only the slice it is on. Where the propagated answer is too
small on every slice (a heart answered as its left half), one positive click per slice is what
it takes, and ten clicks reach ten slices. Re-propagating from the corrected slice, replacing the
neighbours' answers, made things worse (docs/experiments.md, 2026-12-03): it also rewrites
neighbours the earlier answer had right. So the correction is carried only while it keeps doing
what it did on its own slice: after a positive click that *grew* the answer there (the new
answer holds almost all of the old one and is larger), each next slice is decoded from the
previous one as propagation does (its box and logits), and its new answer is taken only if it
too holds almost all of that slice's old answer and is larger. The walk stops at the first slice
where that fails, at a slice with a click of its own, at a slice the answer left empty (where the
object may have ended) and at the 3D box's end. Each carried slice costs one decoder pass.
Measured with the built-in evaluation on every set, both adapters: docs/experiments.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .models import ServingModel
from .predictor import Prediction, SlicePredictor
from .preprocess import SliceGeometry, take_slice
from .propagation import walk


@dataclass(frozen=True)
class CarryPolicy:
    enabled: bool = True  # experiments switch it off in code (tests/test_carry.py compares)
    kept: float = 0.9  # share of a slice's old answer the new one must hold
    growth: float = 1.02  # ... and the new answer's area over the old one's, at least
    min_iou: float = 0.4  # the decoder's own estimate, as propagation's stop


def grew(old: np.ndarray, new: np.ndarray, policy: CarryPolicy) -> bool:
    """True when `new` holds at least `policy.kept` of `old` (non-empty) and is larger by `growth`."""
    old_area = int(old.sum())
    if old_area == 0:
        return False
    return int((old & new).sum()) >= policy.kept * old_area and int(new.sum()) >= policy.growth * old_area


def carry_growth(serving: ServingModel, embed: Callable[[int, int], torch.Tensor], geom: SliceGeometry,
                 previous: np.ndarray, axis: int, start_slice: int, start: Prediction, bounds: Tuple[int, int],
                 clicked: set, policy: CarryPolicy) -> Dict[int, Prediction]:
    """New answers for the slices around `start_slice` the grown correction carries to.
    `previous`: the session's label volume before this request; `bounds`: the slices allowed
    (inclusive); `clicked`: slices with clicks of their own."""
    if not policy.enabled or not grew(take_slice(previous, axis, start_slice) > 0, start.mask, policy):
        return {}
    predictor = SlicePredictor(serving.model, next(serving.model.parameters()).device)

    def step_to(s: int, step: int, prev: Prediction, box) -> Optional[Prediction]:
        old = take_slice(previous, axis, s) > 0
        if s in clicked or not old.any():
            return None
        pred = predictor.predict(embed(s, step), geom, box=box, mask_input=prev.low_res_logits,
                                 adapted_decoder=start.adapted_decoder)
        return pred if pred.iou >= policy.min_iou and grew(old, pred.mask, policy) else None

    return walk(start_slice, start, bounds, step_to)

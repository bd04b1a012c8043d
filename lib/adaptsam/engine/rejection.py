"""What a negative click on a slice with no positive evidence of its own means for the answer.

Propagation without a 3D box runs on past an object's end: the adapted decoder, prompted with
the previous slice's answer, keeps finding a blob of about the same size in whatever lies next,
with a confident IoU estimate, so nothing on the slice says the object has ended. The user then
clicks "not this" on such a slice, and the decoder, prompted with that click, the answer it
propagated there and that answer's box (guide_box.py), keeps the region. So a negative click on
a slice where the user gave no positive click, box or mask is taken as it is meant:
- a connected region of the slice's answer that still holds one of its negative clicks goes;
- when that leaves the slice empty, or the slice's main region (the largest of the answer the
  click was made on, holding the click) is gone from the new answer, the object ends before this
  slice: the answers on the slices beyond it, on the side away from every positive click, were
  propagated from an answer the user has just rejected, and are cleared too, up to the first
  slice with a click of its own. A rejected small island, or a trimmed region, cuts nothing.
With a 3D box the box bounds the object, and nothing here applies. Measured against the earlier
behaviour with the built-in evaluation: docs/experiments.md.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from scipy import ndimage

from .predictor import Prediction
from .preprocess import SliceGeometry
from .prompts import MASK_LOGIT

# a rejected region as the next correction's mask prompt: confidently outside, as a drawn mask's outside
EMPTY_LOGIT = -MASK_LOGIT


def _region_at(regions: np.ndarray, click: Sequence[float]) -> int:
    """The label of the region under a click (row, col); 0 outside every region."""
    return int(regions[int(round(click[0])), int(round(click[1]))])


def drop_rejected(pred: Prediction, negatives: Sequence[Sequence[float]], geom: SliceGeometry) -> Prediction:
    """`pred` without the connected regions that hold a negative click (row, col); their low-res
    logits set to outside, so a later correction on this slice starts from what is shown."""
    regions, _ = ndimage.label(pred.mask)
    hit = {_region_at(regions, click) for click in negatives} - {0}
    if not hit:
        return pred
    removed = np.isin(regions, sorted(hit))
    low = geom.mask_to_model(torch.from_numpy(removed.astype(np.float32)), pred.low_res_logits.shape[-1]) > 0.5
    logits = pred.low_res_logits.clone()
    logits[low.to(logits.device)] = EMPTY_LOGIT
    return Prediction(mask=pred.mask & ~removed, low_res_logits=logits, iou=pred.iou, adapted_decoder=pred.adapted_decoder)


def main_region_rejected(previous: np.ndarray, answer: np.ndarray, negatives: Sequence[Sequence[float]]) -> bool:
    """Whether the largest region of the `previous` answer holds a negative click and none of it
    is left in the new `answer` (an empty answer counts)."""
    if not answer.any():
        return True
    regions, n = ndimage.label(previous)
    if n == 0:
        return False
    main = 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))
    held = any(_region_at(regions, click) == main for click in negatives)
    return held and not (answer & (regions == main)).any()


def slices_after_rejection(k: int, depth: int, positive_slices: Iterable[int], clicked_slices: Iterable[int]) -> List[int]:
    """The slices an emptied slice `k` cuts off: those beyond it on the side without positive
    clicks, up to (not including) the first slice with a click of its own. None when positive
    clicks lie on both sides of `k` (the object goes on past it) or on neither."""
    positives = set(positive_slices)
    below, above = any(s < k for s in positives), any(s > k for s in positives)
    if below == above or k in positives:
        return []
    step = 1 if below else -1
    clicked = set(clicked_slices)
    out = []
    s = k + step
    while 0 <= s < depth and s not in clicked:
        out.append(s)
        s += step
    return out


def empty_answers(slices: Iterable[int], shape: Tuple[int, int], low_res: int) -> Dict[int, Prediction]:
    """Empty answers for cleared slices (logits confidently outside, as a drawn empty slice)."""
    return {s: Prediction(mask=np.zeros(shape, bool), low_res_logits=torch.full((1, 1, low_res, low_res), EMPTY_LOGIT), iou=0.0)
            for s in slices}

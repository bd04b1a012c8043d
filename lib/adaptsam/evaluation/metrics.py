"""Measures of one structure's answers: Dice, normalised surface distance, the area under the
Dice-per-interaction curve, and how many clicks reach a Dice threshold."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from ..engine.metrics import bounding_box, dice

__all__ = ["dice", "normalised_surface_distance", "dice_auc", "clicks_to"]


def _crop(pred: np.ndarray, truth: np.ndarray, margin: int):
    box = bounding_box(pred | truth)
    if box is None:
        return pred, truth
    n = pred.ndim
    sl = tuple(slice(max(0, box[d] - margin), box[d + n] + margin + 1) for d in range(n))
    return pred[sl], truth[sl]


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def normalised_surface_distance(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float = 2.0) -> float:
    """Share of both surfaces lying within `tolerance_mm` of the other surface (NSD)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    if not pred.any() and not truth.any():
        return 1.0
    if not pred.any() or not truth.any():
        return 0.0
    margin = int(np.ceil(tolerance_mm / min(spacing))) + 2
    pred, truth = _crop(pred, truth, margin)
    sp, st = _surface(pred), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~sp, sampling=spacing)
    close = (to_truth[sp] <= tolerance_mm).sum() + (to_pred[st] <= tolerance_mm).sum()
    return float(close / (sp.sum() + st.sum()))


def dice_auc(dices: Sequence[float]) -> float:
    """Area under Dice against interaction step (0, 1, ... n), divided by n: 1 is perfect from
    the first prompt on. A single step is its own Dice."""
    d = np.asarray(dices, float)
    if len(d) == 1:
        return float(d[0])
    return float(np.trapezoid(d) / (len(d) - 1)) if hasattr(np, "trapezoid") else float(np.trapz(d) / (len(d) - 1))


def clicks_to(dices: Sequence[float], threshold: float) -> Optional[int]:
    """The first click count (1-based) whose Dice reaches `threshold`; None if none does."""
    for n, d in enumerate(dices, 1):
        if d >= threshold:
            return n
    return None

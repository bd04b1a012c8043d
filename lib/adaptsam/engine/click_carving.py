"""Clicks painted into the carried mask prompt, so that the previous answer cannot outvote them.

A correction is decoded with the previous answer's logits as mask prompt (the adapters were
trained so). The decoder leans on that prompt far more than on the clicks: a negative click in
the middle of a false-positive region can leave the answer unchanged, round after round. So
before the previous logits go back in, every click of the slice paints its neighbourhood with
its own label (saturated logits, background first so a positive click wins where both reach): a
disc whose radius is the click's distance to the previous answer's boundary on the low-res grid,
i.e. the largest disc the previous answer paints one way, which is the part the click says is
wrong (or, for a click the answer already agrees with, keeps it so), clamped to 4-16 low-res
pixels so that small structures are not painted over. Measurements: docs/experiments.md.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from .preprocess import SliceGeometry

MIN_RADIUS = 4.0  # low-res pixels
MAX_RADIUS = 16.0
CARVED_LOGIT = 20.0  # saturated: sigmoid(20) = 1 - 2e-9


def click_radii(previous: np.ndarray, rows_cols: np.ndarray, min_radius: float = MIN_RADIUS,
                max_radius: float = MAX_RADIUS) -> np.ndarray:
    """For each low-res pixel (row, col): its distance to the nearest pixel that the previous
    answer (bool mask) paints the other way, clamped to [min_radius, max_radius]."""
    out = np.full(len(rows_cols), max_radius)
    if not previous.any() or previous.all():  # all one way: nothing to measure against
        return out
    to_outside = ndimage.distance_transform_edt(previous)  # inside pixels: distance to the outside
    to_inside = ndimage.distance_transform_edt(~previous)
    for i, (r, c) in enumerate(rows_cols):
        d = to_outside[r, c] if previous[r, c] else to_inside[r, c]
        out[i] = np.clip(d, min_radius, max_radius)
    return out


def carve_clicks(logits: torch.Tensor, geom: SliceGeometry, foreground: Sequence[Sequence[float]] = (),
                 background: Sequence[Sequence[float]] = (), min_radius: float = MIN_RADIUS,
                 max_radius: float = MAX_RADIUS) -> torch.Tensor:
    """The mask prompt for the next decoder pass: `logits` (1, 1, L, L), the previous answer's
    low-res logits, with a disc around each click (slice pixels (row, col)) set to +-CARVED_LOGIT.
    Returns a new tensor; `logits` is left as it was."""
    if not len(foreground) and not len(background):
        return logits.detach().clone()
    rc = np.concatenate([np.asarray(background, float).reshape(-1, 2), np.asarray(foreground, float).reshape(-1, 2)])
    positive = np.array([False] * len(background) + [True] * len(foreground))
    return carve_model_points(logits, geom.points_to_model(rc), positive, geom.size, min_radius, max_radius)


def carve_model_points(logits: torch.Tensor, xy: np.ndarray, positive: np.ndarray, input_size: int,
                       min_radius: float = MIN_RADIUS, max_radius: float = MAX_RADIUS) -> torch.Tensor:
    """carve_clicks for clicks already in model input pixels (x, y), as the trainer simulates
    them; `positive` (bool per click). Negative clicks are painted first, so a positive one wins
    where both reach."""
    size = logits.shape[-1]
    out = logits.detach().clone()
    if not len(xy):
        return out
    order = np.argsort(positive, kind="stable")  # background first
    xy = (np.asarray(xy, np.float64)[order] + 0.5) * (size / input_size) - 0.5  # low-res, pixel-centre convention
    values = np.where(np.asarray(positive)[order], CARVED_LOGIT, -CARVED_LOGIT)
    previous = (out[0, 0] > 0).cpu().numpy()
    grid = torch.arange(size, dtype=torch.float32)
    cells = np.clip(np.rint(xy[:, ::-1]), 0, size - 1).astype(int)  # (row, col) on the low-res grid
    for (cx, cy), r, value in zip(xy, click_radii(previous, cells, min_radius, max_radius), values):
        disc = (grid[:, None] - cy) ** 2 + (grid[None, :] - cx) ** 2 <= r * r
        out[0, 0][disc.to(out.device)] = float(value)
    return out

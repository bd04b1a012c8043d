"""Small mask measures shared by tests, benchmarks, the trainer and prompt simulation."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(pred, truth).sum() / denom)


def bounding_box(mask: np.ndarray) -> Optional[Tuple[int, ...]]:
    """Inclusive bounding box of a 2D or 3D mask: (r0, c0, r1, c1) or (i0, j0, k0, i1, j1, k1)."""
    idx = np.nonzero(mask)
    if idx[0].size == 0:
        return None
    return tuple(int(a.min()) for a in idx) + tuple(int(a.max()) for a in idx)


def largest_slice(mask: np.ndarray, axis: int = 2) -> int:
    """Index of the slice normal to `axis` with the most foreground voxels."""
    other = tuple(d for d in range(mask.ndim) if d != axis)
    return int(np.asarray(mask, bool).sum(axis=other).argmax())

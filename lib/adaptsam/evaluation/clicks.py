"""Deterministic click protocol shared by validation, the quality benchmark and the tests.

The usual interactive-segmentation protocol (as in RITM / SAM evaluations): the first click
sits at the point of the object farthest from its boundary; each correction click sits at the
point farthest from the boundary of the largest error region, positive in a miss, negative in
a false positive.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from scipy import ndimage


def interior_point(mask: np.ndarray) -> Optional[Tuple[int, int]]:
    if not mask.any():
        return None
    # pad so the image border counts as boundary
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(dist.argmax()), dist.shape)
    return int(r), int(c)


def correction_click(pred: np.ndarray, truth: np.ndarray) -> Optional[Tuple[int, int, bool]]:
    """(row, col, positive) in the largest error region, or None when there is no error."""
    fn = truth & ~pred
    fp = pred & ~truth
    best = None
    for region_mask, positive in ((fn, True), (fp, False)):
        labels, n = ndimage.label(region_mask)
        if n == 0:
            continue
        sizes = ndimage.sum(region_mask, labels, index=range(1, n + 1))
        i = int(np.argmax(sizes))
        if best is None or sizes[i] > best[0]:
            best = (sizes[i], labels == i + 1, positive)
    if best is None:
        return None
    r, c = interior_point(best[1])
    return r, c, best[2]

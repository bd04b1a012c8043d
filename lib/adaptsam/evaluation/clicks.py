"""Where the interactive protocol clicks, on a slice (2D) or in a volume (3D).

The usual protocol (RITM / SAM evaluations; the CVPR 2025 interactive 3D challenge in 3D): the
first click sits at the point of the object farthest from its boundary; each correction sits at
the point farthest from the boundary of the largest error region, positive in a miss, negative
in a false positive. Used by the evaluation, the trainer's validation and its prompt simulation.
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


def interior_voxel(mask: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Optional[Tuple[int, int, int]]:
    """The voxel of a 3D mask farthest (in mm) from its boundary, the volume's faces included."""
    if not mask.any():
        return None
    box = [slice(max(0, a.min() - 1), a.max() + 2) for a in np.nonzero(mask)]
    crop = np.pad(mask[tuple(box)], 1)
    dist = ndimage.distance_transform_edt(crop, sampling=spacing)[1:-1, 1:-1, 1:-1]
    idx = np.unravel_index(int(dist.argmax()), dist.shape)
    return tuple(int(i + b.start) for i, b in zip(idx, box))


def correction_voxel(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Optional[Tuple[int, int, int, bool]]:
    """(i, j, k, positive) at the centre of the largest 3D error region (as in the CVPR 2025
    interactive 3D protocol): positive in a miss, negative in a false positive."""
    best = None
    for region, positive in ((truth & ~pred, True), (pred & ~truth, False)):
        labels, n = ndimage.label(region)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        i = int(np.argmax(sizes))
        if best is None or sizes[i] > best[0]:
            best = (sizes[i], labels == i + 1, positive)
    if best is None:
        return None
    return (*interior_voxel(best[1], spacing), best[2])

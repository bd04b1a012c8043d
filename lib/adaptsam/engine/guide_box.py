"""A box to go with correction clicks: the previous answer's box, widened to take the positive clicks.

LiteMedSAM was trained on boxes, and the adapters keep that strength: they answer a box far
better than a click. A correction click alone says little about the object's extent: after a
first click on the liver the answer is a blob, and a positive click in the missed part often
grows it only locally, or a negative one eats into the right part. So once a slice has an
answer, each further click on it also sends a box: the bounding box of the previous mask,
widened only where a positive click lies outside it, by a margin of 10% of the box's side (at
least 3 pixels). Only clicks widen it, never the mask itself, so the box cannot creep outward
round after round. It needs no state beyond the previous mask. Measurements: docs/experiments.md.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from .metrics import bounding_box

MARGIN = 0.1  # of the box's height / width, around each positive click outside it
MIN_MARGIN_PX = 3.0

Box = Tuple[float, float, float, float]  # (r0, c0, r1, c1), inclusive, slice pixels


def guide_box(previous: np.ndarray, positives: Sequence[Sequence[float]], margin: float = MARGIN,
              min_margin_px: float = MIN_MARGIN_PX) -> Optional[Box]:
    """Box for the next decoder pass on a slice whose previous answer was `previous` (bool
    mask), given every positive click (row, col) on that slice; None when there is neither."""
    box = bounding_box(previous) if previous.any() else None
    pos = np.asarray(positives, dtype=float).reshape(-1, 2)
    if box is None:
        if not len(pos):
            return None
        box = (pos[:, 0].min(), pos[:, 1].min(), pos[:, 0].max(), pos[:, 1].max())
    r0, c0, r1, c1 = (float(v) for v in box)
    if len(pos):
        mr = max(min_margin_px, margin * (r1 - r0 + 1))
        mc = max(min_margin_px, margin * (c1 - c0 + 1))
        r0, c0 = min(r0, (pos[:, 0] - mr).min()), min(c0, (pos[:, 1] - mc).min())
        r1, c1 = max(r1, (pos[:, 0] + mr).max()), max(c1, (pos[:, 1] + mc).max())
    rows, cols = previous.shape
    return (max(r0, 0.0), max(c0, 0.0), min(r1, rows - 1.0), min(c1, cols - 1.0))

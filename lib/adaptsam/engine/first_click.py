"""A lone first click answered through boxes the model proposes to itself.

The network underneath is box-first: an adapter answers a box on a large organ far better than
one click in it, and a click's answer tends to be a blob of about the same size whatever the
organ. The size is what one click leaves open, and the decoder's IoU head can judge a size it is
shown. So a lone first click is decoded as usual, and again with the click plus boxes around
that first answer: its bounding box scaled by SCALES about its centre. Of those answers the one
with the highest predicted IoU that contains the click is the reply (the first answer itself
competes; an answer without the click segmented something else, such as the vertebra around a
spinal-cord click). Five more decoder passes, on the first click of a slice only. How this was
chosen against other candidates: docs/experiments.md.

The candidates are ranked by the IoU head before their masks are made: the output upscaling is
paid only for the answers looked at, usually one or two. The five box passes are one batched
decoder call: with the decoder's folded arithmetic (model/mask_decoder.py) a batch costs less
than the passes one by one on a CPU as well (benchmarks/decoder.py; docs/experiments.md).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np

from .metrics import bounding_box
from .predictor import Prediction, SlicePredictor
from .preprocess import SliceGeometry

SCALES = (1.0, 1.25, 1.5, 2.0, 3.0)  # box side over the first answer's box side


def proposal_boxes(mask: np.ndarray, scales: Sequence[float] = SCALES) -> List[Tuple[float, float, float, float]]:
    """Boxes (r0, c0, r1, c1) around `mask`'s bounding box, each side scaled about its centre
    (a one-pixel margin at scale 1 so the box encloses the answer), clipped to the slice."""
    box = bounding_box(mask)
    if box is None:
        return []
    r0, c0, r1, c1 = box
    rc, cc = (r0 + r1) / 2, (c0 + c1) / 2
    hr, hc = (r1 - r0) / 2 + 1, (c1 - c0) / 2 + 1
    rows, cols = mask.shape
    return [(max(0.0, rc - s * hr), max(0.0, cc - s * hc), min(rows - 1.0, rc + s * hr), min(cols - 1.0, cc + s * hc))
            for s in scales]


def answer_lone_click(predictor: SlicePredictor, embedding, geom: SliceGeometry, click: Sequence[int],
                      scales: Sequence[float] = SCALES, batched: bool = True) -> Prediction:
    """The reply to one positive click (row, col) on a slice with no other prompt; `batched`:
    the box passes as one decoder call (False: one by one, the same answer)."""
    first = predictor.predict(embedding, geom, foreground=[click])
    r, c = int(round(click[0])), int(round(click[1]))
    ranked = predictor.rank_boxes(embedding, geom, proposal_boxes(first.mask, scales), foreground=[click], batched=batched)
    # the best predicted IoU that holds the click, and beats the first answer; ties go to the
    # smaller box. Only the answers looked at here pay for their masks.
    for iou, answer in sorted(ranked, key=lambda pair: -pair[0]):
        if iou <= first.iou:
            break
        pred = answer()
        # a box answer that leaves the click out segmented something else (the vertebra around
        # a spinal cord click): the click says where the object is
        if pred.mask[r, c]:
            return pred
    return first

"""The one prompt recipe: what a slice's prompts and the session's last answer become in one
decoder call. The server, the trainer's validation, the evaluation and the benchmarks all call
`decode_slice`, so a number measured anywhere is a number of what is served.

The pieces, each in its own module with the reasons for it:
- a correction (a click on a slice the session already answered) gets the previous answer's
  low-res logits as SAM's mask prompt, as the adapters were trained (`carry_logits`), with every
  click of the slice carved into them (click_carving.py), and, unless the request has its own
  box or mask, the guide box: the previous answer's box widened around positive clicks outside
  it (guide_box.py);
- a lone positive click on a slice with nothing else is answered, by an adapted model, through
  boxes around its first answer (first_click.py); the base model picks among SAM's three
  ambiguity masks instead;
- an uploaded mask is a dense prompt of saturated logits, and, on a slice without clicks, its
  bounding box is the box prompt;
- a box with nothing a user clicked or drew on its slice is answered by the base model's decoder
  on the adapted embedding (and so are the slices propagated from it, propagation.py): the
  decoder adapters are what learn clicks, and away from the data they trained on they were
  measured to cost box answers what the encoder adapters gain (docs/experiments.md). A version
  the publish gate measured answering boxes better through its own decoder on a site's labels
  says so in its file, and is served that way (`ServingModel.boxes_on_base_decoder`).

`PromptPolicy` names the recipe's switches. Users do not set them; an experiment sets a field in
code to measure the variant against the default (docs/experiments.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .click_carving import carve_clicks
from .errors import RequestError
from .first_click import answer_lone_click
from .guide_box import guide_box
from .metrics import bounding_box
from .models import ServingModel
from .predictor import Prediction, SlicePredictor
from .preprocess import SliceGeometry

Box = Tuple[float, float, float, float]  # (r0, c0, r1, c1), inclusive slice pixels
MASK_LOGIT = 8.0  # an uploaded mask as low-res logits: confident, not saturated


@dataclass(frozen=True)
class PromptPolicy:
    carry_logits: Optional[bool] = None  # None: as the served adapter was trained (its file says)
    guide_box: bool = True
    carve_clicks: bool = True
    first_click_boxes: bool = True
    boxes_on_base_decoder: Optional[bool] = None  # a box alone: None: as the served version's file says

    def carries_logits(self, serving: ServingModel) -> bool:
        return serving.carries_logits if self.carry_logits is None else self.carry_logits

    def adapted_decoder(self, serving: ServingModel, clicks: int, user_mask: bool) -> bool:
        """Whether a slice prompted by a box (and `clicks` clicks, a mask the user drew or not)
        is answered with the decoder adapters."""
        on_base = serving.boxes_on_base_decoder if self.boxes_on_base_decoder is None else self.boxes_on_base_decoder
        return clicks > 0 or user_mask or not on_base


SERVED = PromptPolicy()


@dataclass
class SlicePrompt:
    """Everything known about one slice for one decoder call, in slice pixels (row, col)."""

    foreground: Sequence[Sequence[float]] = ()
    background: Sequence[Sequence[float]] = ()
    box: Optional[Box] = None  # the user's box on this slice
    mask: Optional[np.ndarray] = None  # the user's mask on this slice (bool plane); may be empty
    previous: Optional[torch.Tensor] = None  # (1, 1, L, L) logits of the session's last answer here

    @property
    def clicks(self) -> int:
        return len(self.foreground) + len(self.background)

    def previous_mask(self, geom: SliceGeometry) -> np.ndarray:
        """The session's last answer on this slice, as the decoder is shown it (bool plane)."""
        return (geom.logits_to_plane(self.previous[0, 0]) > 0).cpu().numpy()


def mask_to_prompt(plane: Optional[np.ndarray], geom: SliceGeometry, low_res: int) -> Optional[torch.Tensor]:
    """A binary mask slice as SAM's dense prompt; None for an absent or empty plane."""
    if plane is None or not plane.any():
        return None
    low = geom.mask_to_model(torch.from_numpy(plane.astype(np.float32)), low_res)
    return (low * 2.0 - 1.0) * MASK_LOGIT


def decode_slice(serving: ServingModel, embedding: torch.Tensor, geom: SliceGeometry, prompt: SlicePrompt,
                 policy: PromptPolicy = SERVED) -> Prediction:
    model = serving.model
    predictor = SlicePredictor(model, next(model.parameters()).device)
    fg, bg = list(prompt.foreground), list(prompt.background)
    mask_in = mask_to_prompt(prompt.mask, geom, model.mask_input_size[0])
    if mask_in is None and prompt.previous is not None and policy.carries_logits(serving):
        mask_in = carve_clicks(prompt.previous, geom, fg, bg) if policy.carve_clicks else prompt.previous
    box = prompt.box
    if box is None and prompt.mask is not None and not prompt.clicks:
        box = bounding_box(prompt.mask)
    if box is None and prompt.mask is None and prompt.previous is not None and policy.guide_box and prompt.clicks:
        box = guide_box(prompt.previous_mask(geom), fg)
    if box is None and mask_in is None and not prompt.clicks:
        raise RequestError("nothing to segment on this slice: no click, box or mask lies on it")
    adapted = serving.version > 0
    lone_click = box is None and mask_in is None and prompt.clicks == 1
    if lone_click and fg and adapted and policy.first_click_boxes:
        return answer_lone_click(predictor, embedding, geom, fg[0])
    # the base model's lone click picks among SAM's ambiguity masks; adapters learnt (and were
    # measured on) the single output
    return predictor.predict(embedding, geom, box=box, foreground=fg, background=bg, mask_input=mask_in,
                             multimask=lone_click and not adapted,
                             adapted_decoder=box is None or policy.adapted_decoder(serving, prompt.clicks, prompt.mask is not None and prompt.mask.any()))

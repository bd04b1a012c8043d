"""The interactive protocol on one slice, through the served prompt recipe (engine/prompts.py).

A box (the object's bounding box), and separately a click session: the first click at the
object's deepest point, then each correction at the centre of the largest error region, each
decoded with the session's previous answer exactly as the server decodes a client's next click
on that slice. The trainer's validation uses it on its in-memory embeddings; a test shows the
server's session path gives the same masks.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from ..engine.metrics import bounding_box, dice
from ..engine.models import ServingModel
from ..engine.predictor import Prediction
from ..engine.preprocess import SliceGeometry
from ..engine.prompts import SERVED, PromptPolicy, SlicePrompt, decode_slice
from .clicks import correction_click, interior_point


def click_session(serving: ServingModel, embedding: torch.Tensor, geom: SliceGeometry, truth: np.ndarray, clicks: int,
                  policy: PromptPolicy = SERVED) -> List[Prediction]:
    """The answers after 1, 2, ... `clicks` protocol clicks (fewer when an answer is perfect)."""
    fg, bg = [interior_point(truth)], []
    pred = decode_slice(serving, embedding, geom, SlicePrompt(foreground=fg), policy)
    answers = [pred]
    for _ in range(clicks - 1):
        c = correction_click(pred.mask, truth)
        if c is None:
            break
        (fg if c[2] else bg).append(c[:2])
        pred = decode_slice(serving, embedding, geom, SlicePrompt(foreground=fg, background=bg, previous=pred.low_res_logits), policy)
        answers.append(pred)
    return answers


def slice_scores(serving: ServingModel, embedding: torch.Tensor, geom: SliceGeometry, truth: np.ndarray,
                 report_clicks: Sequence[int] = (1, 3), policy: PromptPolicy = SERVED) -> Dict[str, float]:
    """Dice for the box and after each of `report_clicks` clicks ({"box": .., "click1": ..})."""
    out = {"box": dice(decode_slice(serving, embedding, geom, SlicePrompt(box=bounding_box(truth)), policy).mask, truth)}
    answers = click_session(serving, embedding, geom, truth, max(report_clicks), policy)
    for n in report_clicks:
        out[f"click{n}"] = dice(answers[min(n, len(answers)) - 1].mask, truth)
    return out

"""Simulated interaction on the decoder's low-res grid: first prompts and correction clicks.

The first prompt is a jittered box or one positive click; each correction round adds 1, 3 or 5
clicks sampled in the error region of the previous answer (positive in misses, negative in
false positives), as in SAM, SAM-Med2D and MSA. A share of the clicks (`protocol_clicks`) is
placed as a user (and the evaluation) places them instead: the object's deepest point, then
the middle of the largest error region. Clicks a clinician really made, recorded when the
label was saved, replace the simulated first click.

Points are kept per sample as (x, y, label) in model-input pixels; low-res pixel (r, c) has
its centre at ((c + 0.5) * s - 0.5, (r + 0.5) * s - 0.5) with s = input size / low-res size.
"""

from __future__ import annotations

import random
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..engine.click_carving import carve_model_points
from ..engine.metrics import bounding_box
from ..evaluation.clicks import correction_click, interior_point

Point = Tuple[float, float, int]  # x, y (model input pixels), 1 positive / 0 negative


class PromptSimulator:
    def __init__(self, rng: random.Random, input_size: int, low_res: int, protocol_clicks: float):
        self.rng = rng
        self.input_size = input_size
        self.low_res = low_res
        self.protocol_clicks = protocol_clicks

    @property
    def scale(self) -> float:
        return self.input_size / self.low_res

    def to_input(self, rc: np.ndarray) -> np.ndarray:
        """Low-res (row, col) -> model input (x, y)."""
        s = self.scale
        return np.stack([(rc[:, 1] + 0.5) * s - 0.5, (rc[:, 0] + 0.5) * s - 0.5], axis=1)

    def jittered_box(self, mask: torch.Tensor) -> np.ndarray:
        """The mask's box with each side moved by up to 10 % of its extent, in input pixels."""
        r0, c0, r1, c1 = bounding_box(mask.numpy())
        h, w = r1 - r0 + 1, c1 - c0 + 1
        j = lambda n: self.rng.uniform(-0.1, 0.1) * n
        s = self.scale
        box = np.array([(c0 + j(w)) * s, (r0 + j(h)) * s, (c1 + 1 + j(w)) * s - 1, (r1 + 1 + j(h)) * s - 1])
        return np.clip(box, 0, self.input_size - 1)

    def random_pixel(self, region: torch.Tensor) -> np.ndarray:
        idx = torch.nonzero(region).numpy()
        if len(idx) == 0:
            return np.zeros((0, 2))
        return idx[[self.rng.randrange(len(idx))]]

    def first_click(self, truth: torch.Tensor, recorded: Optional[List[Point]]) -> List[Point]:
        if recorded:
            return list(recorded)
        if self.rng.random() < self.protocol_clicks:
            rc = np.array([interior_point(truth.numpy())])
        else:
            rc = self.random_pixel(truth)
        xy = self.to_input(rc)
        return [(float(xy[0, 0]), float(xy[0, 1]), 1)]

    def corrections(self, answer: torch.Tensor, truth: torch.Tensor) -> List[Point]:
        """New clicks for one sample given its answer and truth (low-res bool masks)."""
        miss, spill = truth & ~answer, answer & ~truth
        n_miss, n_spill = int(miss.sum()), int(spill.sum())
        if n_miss + n_spill == 0:
            return []
        if self.rng.random() < self.protocol_clicks:
            c = correction_click(answer.numpy(), truth.numpy())
            if c is None:
                return []
            xy = self.to_input(np.array([c[:2]]))
            return [(float(xy[0, 0]), float(xy[0, 1]), 1 if c[2] else 0)]
        out = []
        for _ in range(self.rng.choice((1, 3, 5))):
            positive = self.rng.random() < n_miss / (n_miss + n_spill)
            rc = self.random_pixel(miss if positive else spill)
            if len(rc):
                xy = self.to_input(rc)
                out.append((float(xy[0, 0]), float(xy[0, 1]), 1 if positive else 0))
        return out


def points_tensor(points: List[List[Point]], device) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample point lists -> SAM's (coords (B, N, 2), labels (B, N)), padded with label -1."""
    if not any(points):
        return None
    n = max(len(p) for p in points)
    coords = torch.zeros(len(points), n, 2)
    labels = -torch.ones(len(points), n)
    for i, p in enumerate(points):
        for j, (x, y, label) in enumerate(p):
            coords[i, j] = torch.tensor([x, y])
            labels[i, j] = label
    return coords.to(device), labels.to(device)


def carve(logits: torch.Tensor, points: List[List[Point]], input_size: int) -> torch.Tensor:
    """Each sample's clicks carved into its carried logits, as the server carves them."""
    out = []
    for i, p in enumerate(points):
        xy = np.array([(x, y) for x, y, _ in p], dtype=np.float64).reshape(-1, 2)
        positive = np.array([label == 1 for _, _, label in p], dtype=bool)
        out.append(carve_model_points(logits[i : i + 1].cpu(), xy, positive, input_size))
    return torch.cat(out).to(logits.device)

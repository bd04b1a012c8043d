"""Slice-level prediction: plane -> embedding (encoder) and embedding + prompts -> mask (decoder).

The split is the whole point of the server: embeddings are computed once per slice and cached,
every click only runs `decode`. Prompts arrive in slice pixel indices (row, col) and leave as a
boolean mask on the original slice grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..model.sam import PromptableSam
from .preprocess import SliceGeometry


@dataclass
class Prediction:
    mask: np.ndarray  # (rows, cols) bool on the original slice grid
    low_res_logits: torch.Tensor  # (1, 1, L, L): the next prompt's mask input
    iou: float  # the decoder's own IoU estimate
    adapted_decoder: bool = True  # False: the base model's decoder answered (engine/prompts.py)


class SlicePredictor:
    def __init__(self, model: PromptableSam, device: str | torch.device = "cpu"):
        self.model = model
        self.device = torch.device(device)

    @property
    def input_size(self) -> int:
        return self.model.input_size

    def geometry(self, plane: np.ndarray, spacing: Tuple[float, float] = (1.0, 1.0)) -> SliceGeometry:
        return SliceGeometry.fit(plane.shape[0], plane.shape[1], self.input_size, spacing)

    def model_input(self, plane_u8: np.ndarray, geom: SliceGeometry) -> torch.Tensor:
        """uint8 plane (rows, cols) -> (3, S, S) float in [0, 1]."""
        return geom.image_to_model(torch.from_numpy(np.ascontiguousarray(plane_u8)).float() / 255.0)

    @torch.inference_mode()
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256, h, w) embeddings (on the predictor's device)."""
        return self.model.encode(inputs.to(self.device))

    @torch.inference_mode()
    def predict(
        self,
        embedding: torch.Tensor,
        geom: SliceGeometry,
        box: Optional[Sequence[float]] = None,
        foreground: Sequence[Sequence[int]] = (),
        background: Sequence[Sequence[int]] = (),
        mask_input: Optional[torch.Tensor] = None,
        multimask: bool = False,
        adapted_decoder: bool = True,
    ) -> Prediction:
        """One decoder pass. box = (r0, c0, r1, c1) inclusive; points as (row, col).
        adapted_decoder=False: the base model's decoder on the (adapted) embedding."""
        points = None
        if len(foreground) or len(background):
            rc = np.concatenate([np.asarray(foreground, float).reshape(-1, 2), np.asarray(background, float).reshape(-1, 2)])
            labels = np.array([1] * len(foreground) + [0] * len(background), dtype=np.float32)
            coords = torch.from_numpy(geom.points_to_model(rc))[None].to(self.device)
            points = (coords, torch.from_numpy(labels)[None].to(self.device))
        boxes = None
        if box is not None:
            boxes = torch.from_numpy(geom.box_to_model(*box))[None].to(self.device)
        if points is None and boxes is None and mask_input is None:
            raise ValueError("a prediction needs a box, a click or a mask prompt")
        if mask_input is not None:
            mask_input = mask_input.to(self.device, torch.float32)
        logits, iou = self.model.decode(
            embedding.to(self.device, torch.float32), points=points, boxes=boxes, mask_input=mask_input, multimask=multimask,
            adapted_decoder=adapted_decoder,
        )
        best = int(torch.argmax(iou[0])) if multimask else 0
        return self._prediction(logits[:, best : best + 1], float(iou[0, best]), geom, adapted_decoder)

    @staticmethod
    def _prediction(low_res: torch.Tensor, iou: float, geom: SliceGeometry, adapted_decoder: bool = True) -> Prediction:
        """(1, 1, L, L) logits -> the mask on the slice grid."""
        return Prediction(mask=(geom.logits_to_plane(low_res[0, 0]) > 0).cpu().numpy(), low_res_logits=low_res.cpu(), iou=iou,
                          adapted_decoder=adapted_decoder)

    @torch.inference_mode()
    def rank_boxes(self, embedding: torch.Tensor, geom: SliceGeometry, boxes: Sequence[Sequence[float]],
                   foreground: Sequence[Sequence[int]] = (), batched: bool = False) -> List[Tuple[float, Callable[[], Prediction]]]:
        """For each box (with the same positive clicks): the decoder's IoU estimate of its answer,
        and a function giving that answer, what `predict` gives for it. The output upscaling of an
        answer is paid only when asked for. `batched`: all boxes in one decoder call."""
        coords = torch.from_numpy(geom.points_to_model(np.asarray(foreground, float).reshape(-1, 2)))[None].to(self.device)
        emb = embedding.to(self.device, torch.float32)

        def call(group):
            n = len(group)
            points = (coords.repeat(n, 1, 1), torch.ones(n, coords.shape[1], device=self.device)) if len(foreground) else None
            model_boxes = torch.from_numpy(np.stack([geom.box_to_model(*b) for b in group])).to(self.device)
            return self.model.decode_ranked(emb, points=points, boxes=model_boxes)

        def answer(logits_of, i, iou):
            @torch.inference_mode()
            def get() -> Prediction:
                return self._prediction(logits_of(i), iou, geom)
            return get

        ranked = []
        if not len(boxes):  # no proposals (an empty first answer has no box to grow)
            return ranked
        for group in ([list(boxes)] if batched else [[b] for b in boxes]):
            ious, logits_of = call(group)
            ranked += [(float(ious[i]), answer(logits_of, i, float(ious[i]))) for i in range(len(group))]
        return ranked

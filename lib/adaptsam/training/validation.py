"""Validation during training: the slice protocol (evaluation/slice_protocol.py) through the
served prompt recipe, on embeddings the in-training model computes from the cached activations."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np
import torch

from ..engine.encoder import window_group
from ..engine.models import ServingModel
from ..evaluation.slice_protocol import slice_scores
from ..model.encoder_split import encode_tail
from .data import VolumeSamples

PROMPT_TYPES = ("box", "click1", "click3")


def as_served(model, kind: str, version: int, num_slices: int) -> ServingModel:
    """The in-training model as the server would serve it once published."""
    return ServingModel(model, kind, max(version, 1), num_slices if kind == "3d" else 1, meta={"options": {"carry_logits": True}})


@torch.no_grad()
def validate(serving: ServingModel, volumes: List[VolumeSamples], split: int, max_pairs: int, device,
             ensure_heads: Callable) -> Dict[str, float]:
    """Mean Dice per prompt type over up to `max_pairs` (slice, object) pairs spread evenly."""
    model = serving.model
    model.eval()
    pairs = [(vs, k, v) for vs in volumes for k, s in sorted(vs.slices.items()) for v in s.objects]
    if not pairs:
        return {}
    pairs = pairs[:: max(1, len(pairs) // max_pairs)][:max_pairs]
    scores: Dict[str, List[float]] = {t: [] for t in PROMPT_TYPES}
    embeddings: Dict[Tuple[int, int], torch.Tensor] = {}
    for vs, k, v in pairs:
        if (id(vs), k) not in embeddings:
            group, _ = window_group(k, serving.num_slices, vs.depth)
            ensure_heads(vs, group)
            heads = torch.stack([vs.slices[s].head for s in group]).float().to(device)
            out = encode_tail(model.image_encoder, heads, split)
            for pos, s in enumerate(group):
                embeddings.setdefault((id(vs), s), out[pos : pos + 1])
        sample = vs.slices[k]
        for name, value in slice_scores(serving, embeddings[(id(vs), k)], sample.geom, sample.plane_label == v).items():
            scores[name].append(value)
    return {t: float(np.mean(s)) for t, s in scores.items() if s}

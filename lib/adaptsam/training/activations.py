"""The frozen activations a training run computes once and reuses.

Only the adapters of the encoder's last stage train, and earlier adapters stay at their zero
init, so what enters that stage is the frozen base model's output: computed once per slice when
first needed (a short run touches few slices), kept in fp16 on the slice, in the windows the
server encodes. The decoder-only epochs go one step further and fix the whole embedding.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch

from ..engine.encoder import window_group
from ..model.encoder_split import encode_head, encode_tail
from .data import VolumeSamples


class FrozenActivations:
    def __init__(self, model, split: int, group_size: int, device: torch.device):
        self.model, self.split, self.device = model, split, device
        self.group_size = group_size  # slices encoded together (3d adapters are shaped for stacks)

    @torch.no_grad()
    def ensure(self, vs: VolumeSamples, slices: Iterable[int]) -> None:
        """Activations entering the trained stage for `slices` (and their encoding group)."""
        for k in sorted(set(slices)):
            if vs.slices[k].head is not None:
                continue
            group, _ = window_group(k, self.group_size, vs.depth)
            batch = torch.stack([vs.slices[s].model_input.float() for s in group]).to(self.device)
            heads = encode_head(self.model.image_encoder, self.model.normalize(batch), self.split)
            for s, h in zip(group, heads):
                if vs.slices[s].head is None:
                    vs.slices[s].head = h.half().cpu()

    @torch.no_grad()
    def embed_all(self, volumes: List[VolumeSamples], window_slices: int) -> Dict[Tuple[int, int], torch.Tensor]:
        """Embeddings of every slice with the current adapters: {(id(volume), slice): embedding}."""
        self.model.eval()
        out = {}
        for vs in volumes:
            self.ensure(vs, range(vs.depth))
            for start in range(0, vs.depth, window_slices):
                group, _ = window_group(start, window_slices, vs.depth)
                heads = torch.stack([vs.slices[s].head for s in group]).float().to(self.device)
                emb = encode_tail(self.model.image_encoder, heads, self.split)
                for pos, s in enumerate(group):
                    out.setdefault((id(vs), s), emb[pos].half().cpu())
        return out

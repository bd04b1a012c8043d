"""The model a training run starts from, and which of its tensors train.

A run resumes from the newest published adapter of its kind (a grown layout warm-starts from
it: its tensors in, the new adapters at their zero init). A fresh 3D adapter takes the newest
2D adapter's decoder part, where clicks are learnt. Only the encoder's last stage's adapters and
the decoder adapters train; everything before the split is frozen and cacheable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch

from ..engine.models import published_versions
from ..model import adapter_io
from ..model.adapters import AdapterConfig, attach_adapters, is_adapter_name
from ..model.backbones import build_model, file_sha256
from ..model.encoder_split import default_split, tail_adapter_parameters
from ..model.sam import PromptableSam
from .options import TrainOptions


@dataclass
class StartingPoint:
    model: PromptableSam
    base_version: int  # the published version the run starts from (0: none)
    next_version: int  # what a publication of this run is numbered
    split: int  # encoder stage where training starts
    params: List[torch.nn.Parameter]  # what trains
    images_seen: Set[str] = field(default_factory=set)  # images the starting weights learnt from
    started_from: Dict = field(default_factory=dict)  # the file it took weights from ({}: identity)


def origin(path: Path, meta: Dict, part: str) -> Dict:
    """The file a run took weights from (`part`: all, a warm start into a grown layout, or the
    decoder's), as its result's metadata records it: a rebuild can check it starts where this one did."""
    return {"file": path.name, "sha256": file_sha256(path), "version": meta.get("version"), "part": part}


def starting_layout(opt: TrainOptions, weights_dir: Path, backbone: str) -> AdapterConfig:
    """The decoder-side layout of the adapter the run starts from: the newest of its kind when
    resuming, else (3d) the 2d adapter its decoder is seeded from, else the defaults."""
    versions = published_versions(weights_dir, opt.kind, backbone) if opt.resume else []
    if not versions and opt.kind == "3d":
        versions = published_versions(weights_dir, "2d", backbone)
    if not versions:
        return AdapterConfig()
    try:
        return adapter_io.config_from_meta(adapter_io.read_adapter_meta(versions[-1][1]))
    except (adapter_io.AdapterMismatch, KeyError, TypeError):
        return AdapterConfig()


def prepare(opt: TrainOptions, weights_dir: Path, backbone: str, device: torch.device,
            log: Callable[[str], None]) -> StartingPoint:
    weights_dir = Path(weights_dir)
    versions = published_versions(weights_dir, opt.kind, backbone)
    start = starting_layout(opt, weights_dir, backbone)
    cfg = AdapterConfig(kind=opt.kind, num_slices=opt.num_slices, decoder_blocks=opt.decoder_blocks or start.decoder_blocks)
    model = attach_adapters(build_model(backbone, weights_dir=weights_dir), cfg)
    base_version, seen, started_from = 0, set(), {}
    if opt.resume and versions:
        newest, part = versions[-1][1], "all"
        try:
            meta = adapter_io.load_adapters(newest, model)
            log(f"resuming from {newest.name}")
        except adapter_io.AdapterMismatch as e:
            try:
                meta, part = adapter_io.warm_start(newest, model), "warm start"
                log(f"warm start from {newest.name} (new adapters start as identity)")
            except adapter_io.AdapterMismatch:
                meta = None
                log(f"not resuming from {newest.name}: {e}")
        if meta is not None:
            base_version, seen, started_from = int(meta["version"]), adapter_io.images_seen(meta), origin(newest, meta, part)
    if not base_version and opt.kind == "3d":
        seeded = seed_decoder_from_2d(model, weights_dir, backbone, log)
        if seeded:
            seen, started_from = adapter_io.images_seen(seeded[1]), origin(*seeded, "decoder")
    model.to(device)
    split = default_split(model.image_encoder)
    trainable = set(map(id, tail_adapter_parameters(model.image_encoder, split)))
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in trainable or (name.startswith("mask_decoder.") and is_adapter_name(name)))
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"training {sum(p.numel() for p in params)} adapter parameters (encoder stage {split}+ and decoder) "
        f"of {sum(p.numel() for p in model.parameters())}")
    return StartingPoint(model, base_version, (versions[-1][0] if versions else 0) + 1, split, params, seen, started_from)


def seed_decoder_from_2d(model: PromptableSam, weights_dir: Path, backbone: str,
                         log: Callable[[str], None]) -> Optional[Tuple[Path, Dict]]:
    """A fresh 3d adapter starts with the newest 2d adapter's decoder part: that is where
    clicks are learnt, and it does not depend on how the embeddings were computed. Returns the
    file it took it from and its metadata (None when it took nothing)."""
    versions = published_versions(weights_dir, "2d", backbone)
    if not versions:
        return None
    payload = adapter_io.read_adapter_file(versions[-1][1])
    own = model.state_dict()
    taken = {k: v for k, v in payload["state_dict"].items() if k.startswith("mask_decoder.") and k in own and own[k].shape == v.shape}
    if taken and payload["meta"]["base_sha256"] == model.checkpoint_sha256:
        model.load_state_dict(taken, strict=False)
        log(f"3d decoder adapter initialised from {versions[-1][1].name} ({len(taken)} tensors)")
        return versions[-1][1], payload["meta"]
    return None

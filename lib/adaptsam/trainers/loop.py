"""Adapter-only training on saved labels, with simulated interactive prompts.

Cost on a CPU is what shapes this loop:
- Only adapters in the encoder's last stage (and the prompt-conditioned decoder adapter)
  train. Earlier adapters stay at their zero init, so the activations entering the last stage
  are those of the frozen base: they are computed once per slice before the first epoch and
  cached (fp16). Each step then runs only the last stage, the neck and the decoder, forward and
  backward - about a third of an encoder pass instead of three.
- One image embedding serves several decoder passes: the first prompt (a jittered box or one
  positive click), then `corrections` rounds adding 1, 3 or 5 clicks sampled from the error
  region of the previous prediction (positive in misses, negative in false positives), with the
  previous logits as mask prompt, as in SAM, SAM-Med2D and MSA. Half the clicks follow the
  usual protocol instead (deepest point of the object, then one click in the middle of the
  largest error region). The decoder is cheap; the loss sums over all rounds. Loss: BCE + Dice,
  plus the IoU head's error (the server's propagation trusts the predicted IoU to stop).
  Optionally (`box_consistency`) a distillation term on box-only rounds against a frozen copy
  of the model the run starts from, so that learning clicks does not unlearn boxes; and
  (`guide_corrections`, off: measured worse) the server's guide box in the correction rounds
  after a first click; and (`carve_clicks`, off: a run alone measured worse, averaged with the
  run it started from better) the clicks carved into the carried logits, as served.
- Validation runs the serving code path (SlicePredictor on original-grid prompts) with the
  deterministic click protocol, the guide box and the clicks carved into the carried logits, as
  served; the best epoch by mean validation Dice is what gets published
  (the last epoch when there are no validation images).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from ..engine.allocator import keep_freed_memory
from ..engine.click_carving import carve_clicks, carve_model_points
from ..engine.click_protocol import correction_click, interior_point
from ..engine.encoder import window_group
from ..engine.first_click import answer_lone_click
from ..engine.guide_box import guide_box
from ..engine.metrics import bounding_box, dice
from ..engine.models import published_name, published_versions
from ..engine.predictor import SlicePredictor
from ..model import adapter_io
from ..model.adapters import AdapterConfig, adapter_state_dict, attach_adapters, is_adapter_name, set_adapter_training_mode
from ..model.backbones import build_model
from ..model.encoder_split import default_split, encode_head, encode_tail, tail_adapter_parameters
from .data import VolumeSamples, load_renderings, split_by_image

logger = logging.getLogger(__name__)
PROMPT_TYPES = ("box", "click1", "click3")


@dataclass
class TrainOptions:
    kind: str = "2d"
    max_epochs: int = 10
    learning_rate: float = 1e-3
    val_split: float = 0.2
    train_batch_size: int = 4  # slices (2d) or windows of num_slices (3d)
    seed: int = 0
    corrections: int = 3
    # share of simulated clicks placed as a user would (and the benchmark does): the first in the
    # object's deepest point, each correction in the middle of the largest error region; the
    # rest are sampled uniformly in the object / error region, for robustness
    protocol_clicks: float = 0.5
    min_area: int = 24  # pixels on the decoder's low-res grid
    min_area_fraction: float = 0.0  # ... and this share of the object's largest cross-section
    val_pairs: int = 40
    max_minutes: float = 0.0  # 0: no time limit
    iou_weight: float = 0.1
    num_slices: int = 5
    resume: bool = True  # start from the newest published adapter of this kind
    steps_per_epoch: int = 0  # 0: one pass over the training slices
    decoder_epochs: int = -1  # leading epochs on cached embeddings, decoder adapter only (-1: half)
    # two-way decoder blocks with adapters (AdapterConfig.decoder_blocks); 0: the layout of the
    # adapter this run starts from (so a retrain from the server keeps the shipped layout), else 1
    decoder_blocks: int = 0
    # LoRA rank on the decoder attentions (AdapterConfig.decoder_lora_rank); -1: that of the
    # adapter this run starts from, else 0
    decoder_lora_rank: int = -1
    # feed each round's logits back as the next round's mask prompt (SAM's iterative training);
    # recorded in the adapter's metadata, and the server serves the adapter the same way
    carry_logits: bool = True
    # weight of a term that keeps box-only answers close to those of the adapter this run starts
    # from (a frozen copy, on the embeddings it computed), so that learning clicks does not
    # unlearn boxes, which the base model already answers well (0: off)
    box_consistency: float = 0.0
    # rounds after a first click also get the guide box the server sends with correction clicks
    # (engine/guide_box.py): the previous answer's box widened to take the positive clicks
    guide_corrections: bool = False
    # the clicks are carved into the carried logits of each correction round
    # (engine/click_carving.py), as the server does
    carve_clicks: bool = False
    # also train on each volume as a field of view this wide (mm) would show it, when its own is
    # narrower: organs then appear at the size they have in a body CT reconstructed at the usual
    # ~500 mm, not only at the size a tightly cropped 3 mm volume gives them (0: off)
    field_mm: float = 0.0
    # random correction clicks land inside an error region (a part drawn by area, a pixel at
    # least half its depth) instead of anywhere in it, rims included
    inner_clicks: bool = False

    @classmethod
    def from_request(cls, request: Dict, kind: str) -> "TrainOptions":
        names = {f.name: f.type for f in cls.__dataclass_fields__.values()}
        kw = {"kind": kind}
        for k, v in request.items():
            if k in names and k != "kind" and v is not None and v != "":
                default = getattr(cls, k)
                kw[k] = (str(v).lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)(v)
        return cls(**kw)


@dataclass
class TrainResult:
    published: Optional[str]
    version: int
    best_metric: float
    stats: Dict = field(default_factory=dict)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class AdapterTrainer:
    def __init__(self, datalist: Sequence[Dict], options: TrainOptions, weights_dir: Path, backbone: str = "litemedsam",
                 stats_path: Optional[Path] = None, device: str = "cpu", log: Callable[[str], None] = None,
                 rank: int = 0, world_size: int = 1):
        keep_freed_memory()  # see engine/allocator.py: ~40 % faster passes on CPU
        self.rank, self.world_size = rank, world_size
        self.datalist = list(datalist)
        self.opt = options
        self.weights_dir = Path(weights_dir)
        self.backbone = backbone
        self.stats_path = stats_path
        self.device = torch.device(device)
        self.log = log or (lambda s: logger.info(s))
        self.rng = random.Random(options.seed * 1000 + rank)  # ranks simulate different prompts
        self.teacher = None  # the starting model, frozen, when box_consistency > 0 (see run)
        torch.manual_seed(options.seed)
        np.random.seed(options.seed)

    # ---- setup --------------------------------------------------------------------------------

    def _build_model(self):
        versions = published_versions(self.weights_dir, self.opt.kind, self.backbone)
        start = self._starting_layout(versions)
        cfg = AdapterConfig(kind=self.opt.kind, num_slices=self.opt.num_slices,
                            decoder_blocks=self.opt.decoder_blocks or start.decoder_blocks,
                            decoder_lora_rank=start.decoder_lora_rank if self.opt.decoder_lora_rank < 0 else self.opt.decoder_lora_rank)
        model = attach_adapters(build_model(self.backbone, weights_dir=self.weights_dir), cfg)
        self.base_version = 0
        if self.opt.resume and versions:
            newest = versions[-1][1]
            try:
                meta = adapter_io.load_adapters(newest, model)
                self.log(f"resuming from {newest.name}")
            except adapter_io.AdapterMismatch as e:
                # a layout that grew (more decoder blocks with adapters) starts from the old
                # network exactly: its tensors in, the new adapters at their zero init
                try:
                    meta = adapter_io.warm_start(newest, model)
                    self.log(f"warm start from {newest.name} (new adapters start as identity)")
                except adapter_io.AdapterMismatch:
                    meta = None
                    self.log(f"not resuming from {newest.name}: {e}")
            if meta is not None:
                self.base_version = int(meta["version"])
        if not self.base_version and self.opt.kind == "3d":
            self._seed_decoder_from_2d(model)
        self.next_version = (versions[-1][0] if versions else 0) + 1
        model.to(self.device)
        self.split = default_split(model.image_encoder)
        trainable = set(map(id, tail_adapter_parameters(model.image_encoder, self.split)))
        for name, p in model.named_parameters():
            decoder_adapter = name.startswith("mask_decoder.") and is_adapter_name(name)
            p.requires_grad_(id(p) in trainable or decoder_adapter)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.log(f"training {sum(p.numel() for p in self.params)} adapter parameters "
                 f"(encoder stage {self.split}+ and decoder) of {sum(p.numel() for p in model.parameters())}")
        return model

    def _starting_layout(self, versions) -> AdapterConfig:
        """The decoder-side layout of the adapter this run starts from: the newest of its kind
        when resuming, else (3d) the 2d adapter its decoder is seeded from, else the defaults."""
        if not (self.opt.resume and versions) and self.opt.kind == "3d":
            versions = published_versions(self.weights_dir, "2d", self.backbone)
        elif not self.opt.resume:
            versions = []
        if not versions:
            return AdapterConfig()
        try:
            return adapter_io.config_from_meta(adapter_io.read_adapter_meta(versions[-1][1]))
        except (adapter_io.AdapterMismatch, KeyError, TypeError):
            return AdapterConfig()

    def _seed_decoder_from_2d(self, model) -> None:
        """A fresh 3d adapter starts with the newest 2d adapter's decoder part: that is where
        clicks are learnt, and it does not depend on how the embeddings were computed."""
        versions = published_versions(self.weights_dir, "2d", self.backbone)
        if not versions:
            return
        payload = adapter_io.read_adapter_file(versions[-1][1])
        own = model.state_dict()
        taken = {k: v for k, v in payload["state_dict"].items() if k.startswith("mask_decoder.") and k in own and own[k].shape == v.shape}
        if taken and payload["meta"]["base_sha256"] == model.checkpoint_sha256:
            model.load_state_dict(taken, strict=False)
            self.log(f"3d decoder adapter initialised from {versions[-1][1].name} ({len(taken)} tensors)")

    def _load_data(self, items, wide_field: bool = False) -> List[VolumeSamples]:
        """Renderings of each labelled volume: CT in both windows; with `wide_field` (training
        only, option field_mm) each also as a field_mm-wide field of view shows it."""
        fields = (0.0, self.opt.field_mm) if wide_field and self.opt.field_mm > 0 else (0.0,)
        out = []
        for item in items:
            for window in ("default", "soft"):
                renderings = load_renderings(item["image"], item["label"], self.model.input_size, self.low_res, self.opt.min_area,
                                             window, self.opt.min_area_fraction, fields)
                for r in renderings:
                    r.prompts = item.get("prompts", [])
                out.extend(renderings)
                if renderings[0].modality != "CT":  # the window choice only exists for CT
                    break
        return out

    @torch.no_grad()
    def _cache_heads(self, volumes: List[VolumeSamples]) -> None:
        enc = self.model.image_encoder
        # 3d adapters (identity before the split, but still shaped for stacks) need whole stacks
        n = self.opt.num_slices if self.opt.kind == "3d" else 4
        for vs in volumes:
            ks = sorted(vs.slices)
            for i in range(0, len(ks), n):
                group = ks[i : i + n]
                padded = group + [group[-1]] * (n - len(group))
                batch = torch.stack([vs.slices[k].model_input.float() for k in padded]).to(self.device)
                heads = encode_head(enc, self.model.normalize(batch), self.split)
                for k, h in zip(group, heads):
                    vs.slices[k].head = h.half().cpu()

    # ---- prompt simulation on the low-res grid --------------------------------------------------

    def _to_input(self, rc: np.ndarray) -> np.ndarray:
        s = self.model.input_size / self.low_res
        return np.stack([(rc[:, 1] + 0.5) * s - 0.5, (rc[:, 0] + 0.5) * s - 0.5], axis=1)

    def _jittered_box(self, mask: torch.Tensor) -> np.ndarray:
        r0, c0, r1, c1 = bounding_box(mask.numpy())
        h, w = r1 - r0 + 1, c1 - c0 + 1
        j = lambda n: self.rng.uniform(-0.1, 0.1) * n
        s = self.model.input_size / self.low_res
        box = np.array([(c0 + j(w)) * s, (r0 + j(h)) * s, (c1 + 1 + j(w)) * s - 1, (r1 + 1 + j(h)) * s - 1])
        return np.clip(box, 0, self.model.input_size - 1)

    def _guide_boxes(self, hard: torch.Tensor, points: List[List[Tuple[float, float, int]]]) -> torch.Tensor:
        """The server's guide box (engine/guide_box.py) per sample, from the previous answer on
        the low-res grid and the positive clicks so far, in model input pixels."""
        s = self.model.input_size / self.low_res
        out = []
        for i, p in enumerate(points):
            pos = [((y + 0.5) / s - 0.5, (x + 0.5) / s - 0.5) for x, y, l in p if l == 1]
            g = guide_box(hard[i, 0].cpu().numpy(), pos) or (0, 0, self.low_res - 1, self.low_res - 1)
            r0, c0, r1, c1 = g
            out.append([c0 * s, r0 * s, (c1 + 1) * s - 1, (r1 + 1) * s - 1])
        return torch.tensor(np.clip(np.array(out), 0, self.model.input_size - 1), dtype=torch.float32)

    def _carved(self, logits: torch.Tensor, points: List[List[Tuple[float, float, int]]]) -> torch.Tensor:
        """Each sample's clicks (model input pixels) carved into its low-res logits, as served."""
        out = []
        for i, p in enumerate(points):
            xy = np.array([(x, y) for x, y, _ in p], dtype=np.float64).reshape(-1, 2)
            positive = np.array([label == 1 for _, _, label in p], dtype=bool)
            out.append(carve_model_points(logits[i : i + 1].cpu(), xy, positive, self.model.input_size))
        return torch.cat(out).to(logits.device)

    def _sample_inner_point(self, region: torch.Tensor) -> np.ndarray:
        """One pixel (row, col) of an error region, as a user would pick it: a connected part
        drawn by its area, then a pixel at least half as deep in it as its deepest one (a click
        on a region's rim says little the decoder can act on)."""
        mask = region.numpy()
        parts, n = ndimage.label(mask)
        if n == 0:
            return np.zeros((0, 2))
        sizes = np.bincount(parts.ravel())[1:]
        part = 1 + int(np.searchsorted(np.cumsum(sizes), self.rng.random() * sizes.sum(), side="right"))
        part = min(part, n)
        depth = ndimage.distance_transform_edt(np.pad(parts == part, 1))[1:-1, 1:-1]
        idx = np.argwhere(depth >= 0.5 * depth.max())
        return idx[[self.rng.randrange(len(idx))]]

    def _sample_points(self, region: torch.Tensor, n: int) -> np.ndarray:
        idx = torch.nonzero(region).numpy()
        if len(idx) == 0:
            return np.zeros((0, 2))
        return idx[[self.rng.randrange(len(idx)) for _ in range(n)]]

    # ---- one optimisation step ------------------------------------------------------------------

    def _decode_rounds(self, emb: torch.Tensor, gts: torch.Tensor, use_box: bool, recorded: List[Optional[List]],
                       teacher_emb: Optional[torch.Tensor] = None):
        """Simulated interaction on a batch; returns (loss, {prompt type: mean Dice})."""
        b = emb.shape[0]
        boxes = torch.tensor(np.stack([self._jittered_box(g) for g in gts]), dtype=torch.float32) if use_box else None
        points: List[List[Tuple[float, float, int]]] = [[] for _ in range(b)]
        if not use_box:
            for i, g in enumerate(gts):
                if recorded[i]:
                    points[i] = list(recorded[i])
                    continue
                if self.rng.random() < self.opt.protocol_clicks:
                    pr = np.array([interior_point(g.numpy())])
                else:
                    pr = self._sample_points(g, 1)
                xy = self._to_input(pr)
                points[i] = [(float(xy[0, 0]), float(xy[0, 1]), 1)]
        mask_in = None
        loss = emb.new_zeros(())
        dices: Dict[str, float] = {}
        target = gts.float().unsqueeze(1).to(emb.device)
        for rnd in range(1 + self.opt.corrections):
            pts = None
            if any(points):
                n = max(len(p) for p in points)
                coords = torch.zeros(b, n, 2)
                labels = -torch.ones(b, n)
                for i, p in enumerate(points):
                    for j, (x, y, l) in enumerate(p):
                        coords[i, j] = torch.tensor([x, y])
                        labels[i, j] = l
                pts = (coords.to(emb.device), labels.to(emb.device))
            logits, iou_pred = self.model.decode(emb, points=pts, boxes=None if boxes is None else boxes.to(emb.device), mask_input=mask_in)
            prob = torch.sigmoid(logits)
            inter = (prob * target).sum((1, 2, 3))
            soft_dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3))
            with torch.no_grad():
                hard = logits > 0
                true_iou = (hard & (target > 0)).sum((1, 2, 3)).float() / ((hard | (target > 0)).sum((1, 2, 3)).float() + 1e-6)
                hard_dice = 2 * (hard & (target > 0)).sum((1, 2, 3)).float() / (hard.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1e-6)
            loss = loss + (bce + soft_dice).mean() + self.opt.iou_weight * F.mse_loss(iou_pred[:, 0], true_iou)
            if rnd == 0 and use_box and teacher_emb is not None:
                with torch.no_grad():
                    t_logits, _ = self.teacher.decode(teacher_emb, boxes=boxes.to(emb.device))
                loss = loss + self.opt.box_consistency * F.binary_cross_entropy_with_logits(logits, torch.sigmoid(t_logits))
            name = ("box" if use_box else "click1") if rnd == 0 else f"{'box' if use_box else 'click'}+{rnd}"
            dices[name] = float(hard_dice.mean())
            if rnd == self.opt.corrections:
                break
            mask_in = logits.detach() if self.opt.carry_logits else None
            for i in range(b):
                err_fn = (target[i, 0] > 0) & ~hard[i, 0]
                err_fp = hard[i, 0] & ~(target[i, 0] > 0)
                n_new = self.rng.choice((1, 3, 5))
                n_fn, n_fp = int(err_fn.sum()), int(err_fp.sum())
                if n_fn + n_fp == 0:
                    continue
                if self.rng.random() < self.opt.protocol_clicks:
                    c = correction_click(hard[i, 0].cpu().numpy(), (target[i, 0] > 0).cpu().numpy())
                    if c is not None:
                        xy = self._to_input(np.array([c[:2]]))
                        points[i].append((float(xy[0, 0]), float(xy[0, 1]), 1 if c[2] else 0))
                    continue
                for _ in range(n_new):
                    positive = self.rng.random() < n_fn / (n_fn + n_fp)
                    region = (err_fn if positive else err_fp).cpu()
                    pr = self._sample_inner_point(region) if self.opt.inner_clicks else self._sample_points(region, 1)
                    if len(pr):
                        xy = self._to_input(pr)
                        points[i].append((float(xy[0, 0]), float(xy[0, 1]), 1 if positive else 0))
            if not use_box and self.opt.guide_corrections:
                boxes = self._guide_boxes(hard, points)
            if mask_in is not None and self.opt.carve_clicks:
                mask_in = self._carved(mask_in, points)
        return loss, dices

    def _batch(self, pairs, embeddings: Optional[Dict] = None) -> Tuple[torch.Tensor, torch.Tensor, List, Optional[torch.Tensor]]:
        """2d: pairs of (volume, slice); 3d: windows. Returns head activations (or, in the
        decoder phase, cached embeddings), GT masks, recorded prompts, and the starting model's
        embeddings when the box-consistency term needs them."""
        heads, gts, recorded, teacher = [], [], [], []
        n = self.opt.num_slices if self.opt.kind == "3d" else 1
        for vs, k in pairs:
            sample = vs.slices[k]
            value = self.rng.choice(sample.objects)
            ks = [min(max(s, 0), vs.depth - 1) for s in range(k - n // 2, k - n // 2 + n)]
            for s in ks:
                sl = vs.slices[s]
                heads.append(sl.head if embeddings is None else embeddings[(id(vs), s)])
                if value in sl.low_res:
                    gts.append(sl.low_res[value])
                else:
                    gts.append(torch.zeros(self.low_res, self.low_res, dtype=torch.bool))
                recorded.append(vs.recorded_clicks(s, value) or None)
                if self.teacher is not None:
                    teacher.append(self.teacher_embeddings[(id(vs), s)])
        return torch.stack(heads).float(), torch.stack(gts), recorded, (torch.stack(teacher).float() if teacher else None)

    def _step(self, pairs, optimizer, embeddings: Optional[Dict] = None) -> Dict[str, float]:
        heads, gts, recorded, teacher_emb = self._batch(pairs, embeddings)
        set_adapter_training_mode(self.model)
        if embeddings is None:
            emb = encode_tail(self.model.image_encoder, heads.to(self.device), self.split)
        else:  # decoder phase: the encoder's output is fixed, only the decoder adapter learns
            emb = heads.to(self.device)
        keep = [i for i, g in enumerate(gts) if int(g.sum()) >= self.opt.min_area]
        optimizer.zero_grad(set_to_none=True)
        dices: Dict[str, float] = {}
        if keep:
            use_box = self.rng.random() < 0.5
            loss, dices = self._decode_rounds(emb[keep], gts[keep], use_box, [recorded[i] for i in keep],
                                              None if teacher_emb is None else teacher_emb[keep].to(self.device))
            loss.backward()
            dices["loss"] = float(loss.detach())
        if self.world_size > 1:
            self._all_reduce_grads()
        elif not keep:
            return {}
        optimizer.step()
        return dices

    def _all_reduce_grads(self) -> None:
        """Average adapter gradients over ranks (every rank calls this once per step, in the
        same parameter order, even when its batch had nothing to learn from)."""
        import torch.distributed as dist

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= self.world_size

    @torch.no_grad()
    def _embed_all(self, volumes: List[VolumeSamples]) -> Dict[Tuple[int, int], torch.Tensor]:
        """Embeddings of every slice with the current adapters, window-aligned as served."""
        self.model.eval()
        n = self.opt.num_slices if self.opt.kind == "3d" else 4
        out = {}
        for vs in volumes:
            for start in range(0, vs.depth, n):
                group = [min(s, vs.depth - 1) for s in range(start, start + n)]
                heads = torch.stack([vs.slices[s].head for s in group]).float().to(self.device)
                emb = encode_tail(self.model.image_encoder, heads, self.split)
                for pos, s in enumerate(group):
                    out.setdefault((id(vs), s), emb[pos].half().cpu())
        return out

    # ---- validation (the serving path) ---------------------------------------------------------

    @torch.no_grad()
    def validate(self, volumes: List[VolumeSamples]) -> Dict[str, float]:
        self.model.eval()
        predictor = SlicePredictor(self.model, self.device)
        pairs = [(vs, k, v) for vs in volumes for k, s in sorted(vs.slices.items()) for v in s.objects]
        if not pairs:
            return {}
        step = max(1, len(pairs) // self.opt.val_pairs)
        pairs = pairs[::step][: self.opt.val_pairs]
        scores = {t: [] for t in PROMPT_TYPES}
        emb_cache: Dict[Tuple[int, int], torch.Tensor] = {}
        n = self.opt.num_slices if self.opt.kind == "3d" else 1
        for vs, k, v in pairs:
            if (id(vs), k) not in emb_cache:
                group, _ = window_group(k, n, vs.depth)
                heads = torch.stack([vs.slices[s].head for s in group]).float().to(self.device)
                out = encode_tail(self.model.image_encoder, heads, self.split)
                for pos, s in enumerate(group):
                    emb_cache.setdefault((id(vs), s), out[pos : pos + 1])
            emb = emb_cache[(id(vs), k)]
            sample = vs.slices[k]
            truth = sample.plane_label == v
            for name, value in evaluate_prompts(predictor, emb, sample.geom, truth, carry_logits=self.opt.carry_logits).items():
                scores[name].append(value)
        return {t: float(np.mean(s)) for t, s in scores.items() if s}

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        t0 = time.time()
        self.model = self._build_model()
        self.low_res = self.model.mask_input_size[0]
        train_items, val_items = split_by_image(self.datalist, self.opt.val_split, self.opt.seed)
        self.log(f"{len(train_items)} training and {len(val_items)} validation images")
        train = self._load_data(train_items, wide_field=True)
        val = self._load_data(val_items)
        self._cache_heads(train + val)
        self.log(f"cached stage-{self.split} activations for {sum(len(v.slices) for v in train + val)} slices in {time.time() - t0:.0f} s")
        pairs = [(vs, k) for vs in train for k, s in vs.slices.items() if s.objects]
        if not pairs:
            raise ValueError("no training slices: the final labels contain no object of sufficient area")
        n_all = len(pairs)
        if self.world_size > 1:  # each rank takes its share; all ranks run the same number of steps
            pairs = pairs[self.rank :: self.world_size] or pairs[:1]
        optimizer = torch.optim.AdamW(self.params, lr=self.opt.learning_rate, weight_decay=1e-4)
        bs = self.opt.train_batch_size
        steps = self.opt.steps_per_epoch or math.ceil(n_all / (bs * self.world_size))
        # Phase 1 (decoder_epochs): embeddings are computed once and the decoder adapter learns
        # clicks at a few hundred ms per sample; phase 2 trains encoder and decoder adapters jointly.
        decoder_epochs = self.opt.max_epochs // 2 if self.opt.decoder_epochs < 0 else self.opt.decoder_epochs
        embeddings = self._embed_all(train) if decoder_epochs > 0 or self.opt.box_consistency > 0 else None
        if self.opt.box_consistency > 0:
            # the model as it starts: its embeddings are the ones just computed
            self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.teacher_embeddings = embeddings
        best, best_state, history = -1.0, None, []
        lead = self.rank == 0
        baseline = self.validate(val) if val and lead else {}
        if baseline:
            best = float(np.mean(list(baseline.values())))
            self.log(f"validation before training: {baseline}")
        stats = {}
        for epoch in range(1, self.opt.max_epochs + 1):
            self.rng.shuffle(pairs)
            running: Dict[str, List[float]] = {}
            decoder_phase = epoch <= decoder_epochs
            # the decoder phase is ~5x cheaper per sample: give it more samples per epoch
            n_steps = steps * (3 if decoder_phase and not self.opt.steps_per_epoch else 1)
            out_of_time = False
            for i in range(n_steps):
                # single process: the budget also ends an epoch early (ranks of a distributed run
                # must take the same steps, so they only stop between epochs)
                if self.world_size == 1 and self._over_budget(t0):
                    out_of_time = True
                    break
                batch = [pairs[(i * bs + j) % len(pairs)] for j in range(bs)]
                for k, v in self._step(batch, optimizer, embeddings if decoder_phase else None).items():
                    running.setdefault(k, []).append(v)
            if out_of_time and not running:  # the budget ran out before this epoch's first step
                break
            train_metrics = {k: round(float(np.mean(v)), 4) for k, v in running.items()}
            val_metrics = self.validate(val) if val and lead else {}
            metric = float(np.mean(list(val_metrics.values()))) if val_metrics else -train_metrics.get("loss", 0.0)
            # Without validation images there is nothing to choose an epoch by (the training loss
            # moves with the random prompts drawn): the last epoch is published.
            improved = metric > best if val_metrics else True
            if improved:
                best, best_state = metric, copy.deepcopy(adapter_state_dict(self.model))
            elapsed = time.time() - t0
            stats = {
                "name": f"adaptsam_{self.opt.kind}",
                "epoch": epoch,
                "total_epochs": self.opt.max_epochs,
                "total_time": round(elapsed, 1),
                "best_metric": round(best, 4),
                "train_dice": {k: v for k, v in train_metrics.items() if k != "loss"},
                "train_loss": train_metrics.get("loss"),
                "val_dice": {k: round(v, 4) for k, v in val_metrics.items()},
                "val_dice_before": {k: round(v, 4) for k, v in baseline.items()},
                "phase": "decoder adapter on cached embeddings" if decoder_phase else "encoder + decoder adapters",
                "state": "RUNNING",
            }
            history.append(stats)
            self.log(f"epoch {epoch}/{self.opt.max_epochs} {elapsed:.0f}s train {train_metrics} val {val_metrics}{' *' if improved else ''}")
            if self.stats_path and lead:
                _write_json(self.stats_path, stats)
            if self._over_budget(t0):
                break
        if self._over_budget(t0):
            self.log(f"time budget of {self.opt.max_minutes} min reached")
        if not lead:
            return TrainResult(None, self.base_version, best, stats)
        return self._publish(best_state, best, stats, train_items, val_items, t0)

    def _over_budget(self, t0: float) -> bool:
        return bool(self.opt.max_minutes) and time.time() - t0 > 60 * self.opt.max_minutes

    def _publish(self, best_state, best, stats, train_items, val_items, t0) -> TrainResult:
        if best_state is None:
            self.log("no epoch beat the adapter we started from; nothing published")
            stats["state"] = "DONE"
            if self.stats_path:
                _write_json(self.stats_path, stats)
            return TrainResult(None, self.base_version, best, stats)
        self.model.load_state_dict(best_state, strict=False)
        path = self.weights_dir / published_name(self.opt.kind, self.backbone, self.next_version)
        adapter_io.save_adapters(
            path, self.model, self.next_version,
            training_images=[Path(d["image"]).name for d in train_items],
            validation_images=[Path(d["image"]).name for d in val_items],
            # without validation images the "metric" is minus the training loss: say so
            metrics=({"best_val_dice": round(best, 4), **{f"val_{k}": v for k, v in stats.get("val_dice", {}).items()}}
                     if val_items else {"final_train_loss": round(-best, 4), **{f"train_{k}": v for k, v in stats.get("train_dice", {}).items()}}),
            options=asdict(self.opt),
            previous_version=self.base_version,
            train_seconds=round(time.time() - t0, 1),
        )
        stats.update(state="DONE", adapter_version=self.next_version, published=path.name)
        if self.stats_path:
            _write_json(self.stats_path, stats)
        self.log(f"published {path.name} ({'best validation Dice' if val_items else 'minus final training loss'} {best:.4f})")
        return TrainResult(str(path), self.next_version, best, stats)


def evaluate_prompts(predictor: SlicePredictor, emb: torch.Tensor, geom, truth: np.ndarray, clicks: int = 3,
                     carry_logits: bool = True, guide: bool = True, carve: bool = True,
                     first_boxes: bool = True) -> Dict[str, float]:
    """Dice for a box, 1 click and `clicks` clicks (protocol clicks; the first one answered
    through boxes around it when `first_boxes`; the previous logits as mask prompt when
    `carry_logits`, with the clicks carved into it when `carve`, and with `guide` each
    correction also sends the guide box: as the server does for an adapter)."""
    out = {}
    box = bounding_box(truth)
    out["box"] = dice(predictor.predict(emb, geom, box=box).mask, truth)
    fg, bg = [interior_point(truth)], []
    pred = answer_lone_click(predictor, emb, geom, fg[0]) if first_boxes else predictor.predict(emb, geom, foreground=fg)
    out["click1"] = dice(pred.mask, truth)
    for n in range(2, clicks + 1):
        c = correction_click(pred.mask, truth)
        if c is None:
            break
        (fg if c[2] else bg).append(c[:2])
        box = guide_box(pred.mask, fg) if guide else None
        mask_in = None
        if carry_logits:
            mask_in = carve_clicks(pred.low_res_logits, geom, fg, bg) if carve else pred.low_res_logits
        pred = predictor.predict(emb, geom, box=box, foreground=fg, background=bg, mask_input=mask_in)
        if n in (3, 5):
            out[f"click{n}"] = dice(pred.mask, truth)
    out.setdefault(f"click{clicks}", dice(pred.mask, truth))
    return out


def _distributed_worker(rank: int, world_size: int, backend: str, kwargs: Dict) -> None:
    import torch.distributed as dist

    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        device = f"cuda:{rank}" if backend == "nccl" else "cpu"
        if backend == "nccl":
            torch.cuda.set_device(rank)
        AdapterTrainer(**kwargs, device=device, rank=rank, world_size=world_size).run()
    finally:
        dist.destroy_process_group()


def train_distributed(world_size: int, backend: Optional[str] = None, **kwargs) -> None:
    """Run the trainer in `world_size` processes (one per GPU with NCCL; gloo on CPU), the
    adapter gradients averaged every step; rank 0 validates and publishes. MONAI Label sets
    MASTER_ADDR/MASTER_PORT for its training subprocess; defaults cover a standalone run."""
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kwargs.pop("log", None)  # not picklable in general; ranks log through print
    mp.spawn(_distributed_worker, args=(world_size, backend, {**kwargs, "log": print}), nprocs=world_size, join=True)

"""Adapter-only training on saved labels, with simulated interactive prompts.

Cost on a CPU is what shapes this loop:
- Only adapters in the encoder's last stage (and the decoder adapters) train. Earlier adapters
  stay at their zero init, so the activations entering the last stage are those of the frozen
  base: they are computed once per slice, when first needed, and cached (activations.py). A
  step then runs only the last stage, the neck and the decoder, forward and backward.
- One image embedding serves several decoder passes: the first prompt, then `corrections`
  rounds of simulated clicks (simulation.py) with the previous logits as mask prompt. The
  decoder is cheap; the loss (losses.py) sums over all rounds.
- The first `decoder_epochs` train only the decoder adapter, on embeddings computed once.
- Validation (validation.py) runs the served prompt recipe; the best epoch by mean validation
  Dice is the run's result (the last epoch when there are no validation images).
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..engine.allocator import keep_freed_memory
from ..model import adapter_io
from ..model.adapters import adapter_state_dict, set_adapter_training_mode
from ..model.encoder_split import encode_tail
from . import distributed, gate, publish, starting_point, validation
from .activations import FrozenActivations
from .data import VolumeSamples, image_name, load_pair, split_by_image
from .losses import round_loss
from .options import TrainOptions
from .simulation import Point, PromptSimulator, carve, points_tensor

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    published: Optional[str]
    version: int
    best_metric: float
    stats: Dict = field(default_factory=dict)


class AdapterTrainer:
    def __init__(self, datalist: Sequence[Dict], options: TrainOptions, weights_dir: Path, backbone: str = "litemedsam",
                 stats_path: Optional[Path] = None, device: str = "cpu", log: Callable[[str], None] = None,
                 rank: int = 0, world_size: int = 1, alive: Optional[Callable[[], bool]] = None):
        keep_freed_memory()  # see engine/allocator.py
        self.alive = alive or (lambda: True)  # False once whoever started the run is gone: stop, publish nothing
        self.rank, self.world_size = rank, world_size
        self.datalist = list(datalist)
        self.opt = options
        self.weights_dir = Path(weights_dir)
        self.backbone = backbone
        self.stats_path = stats_path
        self.device = torch.device(device)
        self.log = log or (lambda s: logger.info(s))
        self.rng = random.Random(options.seed * 1000 + rank)  # ranks simulate different prompts
        self.gate: Optional[gate.Gate] = None
        self.validation_seconds = 0.0  # the last validation's duration: the budget keeps room for one more
        torch.manual_seed(options.seed)
        np.random.seed(options.seed)

    @property
    def window_slices(self) -> int:
        return self.opt.num_slices if self.opt.kind == "3d" else 1

    # ---- data -----------------------------------------------------------------------------------

    def load(self, items: Sequence[Dict]) -> List[VolumeSamples]:
        """Each labelled volume's slices; CT twice, in both windows the server may pick."""
        out = []
        for item in items:
            for window in ("default", "soft"):
                vs = load_pair(item["image"], item["label"], self.model.input_size, self.low_res, self.opt.min_area,
                               window, self.opt.min_area_fraction)
                vs.prompts = item.get("prompts", [])
                out.append(vs)
                if vs.modality != "CT":  # the window choice only exists for CT
                    break
        return out

    # ---- one optimisation step ------------------------------------------------------------------

    def batch(self, pairs, embeddings: Optional[Dict] = None):
        """2d: (volume, slice) pairs; 3d: windows around them. Returns head activations (or, in
        the decoder phase, cached embeddings), target masks and recorded clinician clicks."""
        heads, gts, recorded = [], [], []
        n = self.window_slices
        for vs, k in pairs:
            value = self.rng.choice(vs.slices[k].objects)
            window = [min(max(s, 0), vs.depth - 1) for s in range(k - n // 2, k - n // 2 + n)]
            if embeddings is None:
                self.activations.ensure(vs, window)
            for s in window:
                sl = vs.slices[s]
                heads.append(sl.head if embeddings is None else embeddings[(id(vs), s)])
                gts.append(sl.low_res.get(value, torch.zeros(self.low_res, self.low_res, dtype=torch.bool)))
                recorded.append(vs.recorded_clicks(s, value) or None)
        return torch.stack(heads).float(), torch.stack(gts), recorded

    def decode_rounds(self, emb: torch.Tensor, gts: torch.Tensor, use_box: bool, recorded: List[Optional[List[Point]]]):
        """Simulated interaction on a batch; (loss, {prompt type: mean Dice})."""
        b = emb.shape[0]
        boxes = torch.tensor(np.stack([self.sim.jittered_box(g) for g in gts]), dtype=torch.float32).to(emb.device) if use_box else None
        points: List[List[Point]] = [[] for _ in range(b)] if use_box else [self.sim.first_click(g, r) for g, r in zip(gts, recorded)]
        mask_in = None
        loss = emb.new_zeros(())
        dices: Dict[str, float] = {}
        target = gts.float().unsqueeze(1).to(emb.device)
        for rnd in range(1 + self.opt.corrections):
            logits, iou_pred = self.model.decode(emb, points=points_tensor(points, emb.device), boxes=boxes, mask_input=mask_in)
            step_loss, hard_dice = round_loss(logits, iou_pred, target, self.opt.iou_weight)
            loss = loss + step_loss
            if use_box and rnd == 0:
                # a box alone is served by the base decoder unless the gate measures the version's
                # own better at the site (engine/prompts.py): both answers learn; the corrections
                # continue from the base decoder's, as served by default
                dices["box_own"] = float(hard_dice.mean())
                logits, iou_pred = self.model.decode(emb, points=points_tensor(points, emb.device), boxes=boxes, adapted_decoder=False)
                step_loss, hard_dice = round_loss(logits, iou_pred, target, self.opt.iou_weight)
                loss = loss + step_loss
            first = "box" if use_box else "click1"
            dices[first if rnd == 0 else f"{'box' if use_box else 'click'}+{rnd}"] = float(hard_dice.mean())
            if rnd == self.opt.corrections:
                break
            hard = (logits > 0).detach().cpu()
            for i in range(b):
                points[i].extend(self.sim.corrections(hard[i, 0], gts[i]))
            mask_in = logits.detach()
            if self.opt.carve_clicks:
                mask_in = carve(mask_in, points, self.model.input_size)
        return loss, dices

    def step(self, pairs, optimizer, embeddings: Optional[Dict] = None) -> Dict[str, float]:
        heads, gts, recorded = self.batch(pairs, embeddings)
        set_adapter_training_mode(self.model)
        if embeddings is None:
            emb = encode_tail(self.model.image_encoder, heads.to(self.device), self.split)
        else:  # decoder phase: the encoder's output is fixed, only the decoder adapter learns
            emb = heads.to(self.device)
        keep = [i for i, g in enumerate(gts) if int(g.sum()) >= self.opt.min_area]
        optimizer.zero_grad(set_to_none=True)
        dices: Dict[str, float] = {}
        if keep:
            loss, dices = self.decode_rounds(emb[keep], gts[keep], self.rng.random() < 0.5, [recorded[i] for i in keep])
            loss.backward()
            dices["loss"] = float(loss.detach())
        if self.world_size > 1:
            distributed.all_reduce_grads(self.params, self.world_size)
        elif not keep:
            return {}
        optimizer.step()
        return dices

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        t0 = time.time()
        start = starting_point.prepare(self.opt, self.weights_dir, self.backbone, self.device, self.log)
        self.model, self.split, self.params = start.model, start.split, start.params
        # 3d adapters are shaped for stacks of num_slices; 2d slices are encoded four at a time
        self.activations = FrozenActivations(self.model, self.split, self.opt.num_slices if self.opt.kind == "3d" else 4, self.device)
        self.low_res = self.model.mask_input_size[0]
        self.sim = PromptSimulator(self.rng, self.model.input_size, self.low_res, self.opt.protocol_clicks)
        served = validation.as_served(self.model, self.opt.kind, start.next_version, self.opt.num_slices)
        train_items, val_items = split_by_image(self.datalist, self.opt.val_split, self.opt.seed, start.images_seen)
        self.log(f"{len(train_items)} training and {len(val_items)} validation images")
        seen = sorted(image_name(d) for d in val_items if image_name(d) in start.images_seen)
        if seen:  # only when every saved label was learnt from before: the served version is measured on its training data
            self.log(f"validation images the starting version trained on (the gate favours it there): {', '.join(seen)}")
        train, val = self.load(train_items), self.load(val_items)
        self.log(f"loaded {sum(len(v.slices) for v in train + val)} slices in {time.time() - t0:.0f} s")
        pairs = [(vs, k) for vs in train for k, s in vs.slices.items() if s.objects]
        if not pairs:
            raise ValueError("no training slices: the final labels contain no object of sufficient area")
        n_all = len(pairs)
        if self.world_size > 1:  # each rank takes its share; all ranks run the same number of steps
            pairs = pairs[self.rank :: self.world_size] or pairs[:1]
        optimizer = torch.optim.AdamW(self.params, lr=self.opt.learning_rate, weight_decay=1e-4)
        bs = self.opt.train_batch_size
        steps = self.opt.steps_per_epoch or math.ceil(n_all / (bs * self.world_size))
        decoder_epochs = self.opt.max_epochs // 2 if self.opt.decoder_epochs < 0 else self.opt.decoder_epochs
        embeddings = self.activations.embed_all(train, self.window_slices) if decoder_epochs > 0 else None
        lead = self.rank == 0

        def validate() -> Dict[str, float]:
            t = time.time()
            metrics = validation.validate(served, val, self.split, self.opt.val_pairs, self.device, self.activations.ensure) if val and lead else {}
            self.validation_seconds = time.time() - t
            return metrics

        self.gate = gate.Gate(self.weights_dir, self.opt.kind, self.backbone, val_items, str(self.device), self.log)
        if lead and self.opt.publish == "gate" and self.gate.can_measure:
            self.gate.measure_references()
            self.log(f"gate references on {len(val_items)} validation image(s): {self.gate.references}")
        # the best epoch is the run's candidate even when it is below where the run started:
        # the gate, not this slice-level validation, decides what is served
        best, best_state = -float("inf"), None
        baseline = validate()
        if baseline:
            self.log(f"validation before training: {baseline}")
        stats: Dict = {}
        for epoch in range(1, self.opt.max_epochs + 1):
            self.rng.shuffle(pairs)
            running: Dict[str, List[float]] = {}
            decoder_phase = epoch <= decoder_epochs
            # the decoder phase is several times cheaper per sample: give it more samples
            n_steps = steps * (3 if decoder_phase and not self.opt.steps_per_epoch else 1)
            out_of_time = False
            for i in range(n_steps):
                # single process: the budget also ends an epoch early (ranks of a distributed run
                # must take the same steps, so they only stop between epochs)
                if self.world_size == 1 and self.over_budget(t0):
                    out_of_time = True
                    break
                batch = [pairs[(i * bs + j) % len(pairs)] for j in range(bs)]
                for k, v in self.step(batch, optimizer, embeddings if decoder_phase else None).items():
                    running.setdefault(k, []).append(v)
            if out_of_time and not running:  # the budget ran out before this epoch's first step
                break
            train_metrics = {k: round(float(np.mean(v)), 4) for k, v in running.items()}
            val_metrics = validate()
            metric = float(np.mean(list(val_metrics.values()))) if val_metrics else -train_metrics.get("loss", 0.0)
            # without validation images there is nothing to choose an epoch by: the last one counts
            improved = metric > best if val_metrics else True
            if improved:
                best, best_state = metric, copy.deepcopy(adapter_state_dict(self.model))
            stats = {
                "name": f"adaptsam_{self.opt.kind}", "epoch": epoch, "total_epochs": self.opt.max_epochs,
                "total_time": round(time.time() - t0, 1), "best_metric": round(best, 4) if best_state is not None else 0.0,
                "train_dice": {k: v for k, v in train_metrics.items() if k != "loss"}, "train_loss": train_metrics.get("loss"),
                "val_dice": {k: round(v, 4) for k, v in val_metrics.items()},
                "val_dice_before": {k: round(v, 4) for k, v in baseline.items()},
                "phase": "decoder adapter on cached embeddings" if decoder_phase else "encoder + decoder adapters",
                "state": "RUNNING",
            }
            self.log(f"epoch {epoch}/{self.opt.max_epochs} {stats['total_time']:.0f}s train {train_metrics} val {val_metrics}{' *' if improved else ''}")
            if self.stats_path and lead:
                publish.write_json(self.stats_path, stats)
            if self.over_budget(t0):
                self.log(f"time budget of {self.opt.max_minutes} min reached")
                break
        if not lead:
            return TrainResult(None, start.base_version, best, stats)
        return self._finish(start, best_state, best, stats, train_items, val_items, t0)

    def over_budget(self, t0: float) -> bool:
        """Past the time budget, less what the run still has to do after its last step (validate
        the epoch, measure the candidate at the gate), or nobody waits for the result any more."""
        if not self.alive():
            return True
        reserve = self.validation_seconds + (self.gate.candidate_seconds if self.gate else 0.0)
        return bool(self.opt.max_minutes) and time.time() - t0 > 60 * self.opt.max_minutes - reserve

    def _finish(self, start, best_state, best, stats, train_items, val_items, t0) -> TrainResult:
        def done(result: TrainResult) -> TrainResult:
            stats["state"] = "DONE"
            stats["total_time"] = round(time.time() - t0, 1)
            if self.stats_path:
                publish.write_json(self.stats_path, stats)
            return result

        if not self.alive():
            self.log("the process that started this run is gone: nothing is published")
            stats["gate"] = {"publish": False, "reason": "the server that started the run went away"}
            return done(TrainResult(None, start.base_version, best, stats))
        if best_state is None:
            self.log("no epoch ran; nothing to publish")
            stats["gate"] = {"publish": False, "reason": "no training epoch completed within the time budget"}
            return done(TrainResult(None, start.base_version, best, stats))
        self.model.load_state_dict(best_state, strict=False)
        # without validation images the "metric" is minus the training loss: say so
        metrics = ({"best_val_dice": round(best, 4), **{f"val_{k}": v for k, v in stats.get("val_dice", {}).items()}} if val_items
                   else {"final_train_loss": round(-best, 4), **{f"train_{k}": v for k, v in stats.get("train_dice", {}).items()}})
        options = {**self.opt.to_dict(), "carry_logits": True}
        if self.opt.publish == "always":
            path = publish.publish(self.model, self.weights_dir, self.opt.kind, self.backbone, start, train_items, val_items,
                                   metrics, options, time.time() - t0)
            self.log(f"published {path.name} without the gate (publish=always)")
            stats.update(adapter_version=start.next_version, published=path.name, gate={"publish": True, "reason": "publish=always: not measured"})
            return done(TrainResult(str(path), start.next_version, best, stats))
        candidate = gate.candidate_path(self.weights_dir, self.opt.kind, self.backbone)
        publish.save_candidate(self.model, candidate, start, train_items, val_items, metrics, options, time.time() - t0)
        decision = self.gate.decide(candidate)
        gate.record_box_decoder(candidate, decision.box_decoder)
        gate.write_report(candidate, decision)
        stats["gate"] = decision.to_dict()
        stats["candidate"] = candidate.stem
        self.log(f"gate: {'publish' if decision.publish else 'keep as candidate'} {candidate.name}: {decision.reason}")
        if not decision.publish:
            return done(TrainResult(None, start.base_version, best, stats))
        path = gate.publish_candidate(candidate, self.weights_dir, decision.reason)
        version = adapter_io.read_adapter_meta(path)["version"]
        stats.update(adapter_version=version, published=path.name)
        self.log(f"published {path.name}")
        return done(TrainResult(str(path), version, best, stats))

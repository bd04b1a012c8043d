"""MONAI Label train tasks `adaptsam` and `adaptsam_3d`: adapter-only retraining on final labels.

MONAI Label runs `__call__` in a background subprocess (`POST /train/<model>`, or our
auto-trigger). The datastore's final labels are the training data; prompts recorded when the
label was saved right after an interactive session travel along and are used as real first
clicks. The result is published atomically to the weights dir, where the serving processes
pick it up on their next request.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

import torch

from ..engine.request import parse_bool
from ..training.distributed import train_distributed
from ..training.loop import AdapterTrainer
from ..training.options import TrainOptions
from .datalist import structure_names

logger = logging.getLogger(__name__)

PROMPTS_KEY = "adaptsam_prompts"


def stats_file(weights_dir: Path, kind: str) -> Path:
    return Path(weights_dir) / f"train_stats_{kind}.json"


def datalist_with_prompts(datastore: Datastore):
    items = []
    for d in datastore.datalist():
        image_id = Path(d["image"]).name.split(".")[0]
        info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL.value) or {}
        items.append({**d, "prompts": info.get(PROMPTS_KEY, []), "names": structure_names(info)})
    return items


class AdaptSamTrainTask(TrainTask):
    def __init__(self, kind: str, weights_dir: str, backbone: str, device: str):
        super().__init__(
            f"Retrain the {kind} adapters only (base weights frozen) on the datastore's final labels, "
            "with simulated box/click interaction; the result is published only when the interactive "
            "protocol measures it better on the site's held-out labels"
        )
        self.kind = kind
        self.weights_dir = Path(weights_dir)
        self.backbone = backbone
        self.device = device
        self.defaults: Dict = {}  # from --conf train_<option> <value>

    def config(self) -> Dict:
        d = TrainOptions(kind=self.kind)
        return {
            "max_epochs": d.max_epochs,
            "learning_rate": d.learning_rate,
            "val_split": d.val_split,
            "train_batch_size": d.train_batch_size if self.kind == "2d" else 1,
            "seed": d.seed,
            "max_minutes": 15.0,
            "publish": d.publish,
            **self.defaults,
        }

    def stats(self) -> Dict:
        try:
            return json.loads(stats_file(self.weights_dir, self.kind).read_text())
        except (OSError, ValueError):
            return {}

    def __call__(self, request, datastore: Datastore):
        opts = TrainOptions.from_request({**self.config(), **request}, self.kind)
        datalist = datalist_with_prompts(datastore)
        if not datalist:
            raise ValueError("no final labels in the datastore: save corrections before training")
        stats_path = stats_file(self.weights_dir, self.kind)
        gpus = torch.cuda.device_count() if self.device.startswith("cuda") else 0
        if gpus > 1 and parse_bool(request.get("multi_gpu", True), "multi_gpu"):
            # MONAI Label's multi-GPU path: one process per GPU under torch.distributed
            train_distributed(gpus, datalist=datalist, options=opts, weights_dir=self.weights_dir,
                              backbone=self.backbone, stats_path=stats_path)
            stats = self.stats()
        else:
            trainer = AdapterTrainer(
                datalist, opts, self.weights_dir, self.backbone, stats_path,
                device=self.device, log=lambda s: print(s, flush=True),
            )
            stats = trainer.run().stats
        stats["final_labels"] = len(datalist)
        return stats

"""MONAI Label train tasks `adaptsam` and `adaptsam_3d`: adapter-only retraining on final labels.

MONAI Label runs `__call__` in a background subprocess (`POST /train/<model>`, or our
auto-trigger). The datastore's final labels are the training data; prompts recorded when the
label was saved right after an interactive session travel along and are used as real first
clicks. The result is published atomically to the weights dir, where the serving processes
pick it up on their next request.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Dict

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.train import TrainTask

import torch

from ..engine.request import parse_bool
from ..training.distributed import train_distributed
from ..training.loop import AdapterTrainer
from ..training.options import TrainOptions
from .datalist import image_id_of, structure_names

logger = logging.getLogger(__name__)

PROMPTS_KEY = "adaptsam_prompts"
PR_SET_PDEATHSIG = 1


class ServerLifeline:
    """A training process that MONAI Label started for the server must end with it: a trainer
    whose server is gone would go on using the machine and could publish into a folder nobody
    serves or watches. The kernel sends SIGTERM when the server dies (Linux), and the trainer
    asks `alive()` before every step and before it publishes (the process is re-parented then)."""

    def __init__(self):
        main = getattr(sys.modules.get("__main__"), "__spec__", None)
        self.active = getattr(main, "name", "") == "monailabel.interfaces.utils.app"  # MONAI Label's task runner
        self.server_pid = os.getppid()
        if self.active and sys.platform.startswith("linux"):
            try:
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            except OSError as e:
                logger.warning("cannot ask to be stopped with the server: %s", e)
            if os.getppid() != self.server_pid:  # the server died before the request above
                os.kill(os.getpid(), signal.SIGTERM)

    def alive(self) -> bool:
        return not self.active or os.getppid() == self.server_pid


def stats_file(weights_dir: Path, kind: str) -> Path:
    return Path(weights_dir) / f"train_stats_{kind}.json"


def datalist_with_prompts(datastore: Datastore):
    items = []
    for d in datastore.datalist():
        image_id = image_id_of(d["image"])  # a DICOM series' UID has dots
        info = datastore.get_label_info(image_id, DefaultLabelTag.FINAL.value) or {}
        items.append({**d, "image_id": image_id, "prompts": info.get(PROMPTS_KEY, []), "names": structure_names(info)})
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
        lifeline = ServerLifeline()
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
                device=self.device, log=lambda s: print(s, flush=True), alive=lifeline.alive,
            )
            stats = trainer.run().stats
        stats["final_labels"] = len(datalist)
        return stats

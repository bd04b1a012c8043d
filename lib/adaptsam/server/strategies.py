"""Active learning: which unlabelled image should a clinician annotate next?

`random` and `first` are MONAI Label's own. `uncertainty` ranks unlabelled images by how much
the current 2D model's masks change when its prompts move a little, the prompt-perturbation
disagreement of interactive-segmentation active learning:

- on 3 slices through the middle of the volume, a 4x4 grid of positive clicks over the body
  (voxels brighter than the intensity window's lower 10 %);
- each click is decoded as is and moved by 3 % of the slice size;
- disagreement = 1 - IoU(mask, mask of the moved click), averaged.

A model that has learnt the anatomy of an image answers nearby clicks with the same organ;
where it has not, masks jump. Scores are stored in the image info (`adaptsam_uncertainty`)
with the model version that produced them and reused until the adapter changes. Embeddings
come from the shared cache, so scoring also pre-warms the images it looks at.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Optional

import numpy as np

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from ..engine.interactive import InteractiveSegmenter
from ..engine.predictor import SlicePredictor
from ..engine.preprocess import plane_shape

logger = logging.getLogger(__name__)
INFO_KEY = "adaptsam_uncertainty"


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def disagreement(segmenter: InteractiveSegmenter, image_path: str, image_id: str, slices: int = 3, grid: int = 4) -> float:
    runtime = segmenter.runtime
    vol, image_key = runtime.volumes.get(image_path, image_id)
    serving = runtime.serving(segmenter.handle)
    window = vol.window(None)
    axis = 2
    depth = vol.shape[axis]
    predictor = SlicePredictor(serving.model, next(serving.model.parameters()).device)
    geom = runtime.encoder.geometry(serving, vol, axis)
    rows, cols = plane_shape(vol.shape, axis)
    shift = max(1, int(round(0.03 * max(rows, cols))))
    scores = []
    with runtime.encoder.foreground():
        for k in np.linspace(0.2 * (depth - 1), 0.8 * (depth - 1), slices).round().astype(int):
            plane = vol.normalized_slice(window, axis, int(k))
            body = plane > 25
            emb, _ = runtime.encoder.embedding(serving, vol, image_key, axis, int(k), window)
            for r in np.linspace(0.2, 0.8, grid) * (rows - 1):
                for c in np.linspace(0.2, 0.8, grid) * (cols - 1):
                    r0, c0 = int(r), int(c)
                    if not body[r0, c0]:
                        continue
                    a = predictor.predict(emb, geom, foreground=[(r0, c0)]).mask
                    r1, c1 = min(rows - 1, r0 + shift), min(cols - 1, c0 + shift)
                    b = predictor.predict(emb, geom, foreground=[(r1, c1)]).mask
                    if a.any() or b.any():
                        scores.append(1.0 - _iou(a, b))
    return float(np.mean(scores)) if scores else 0.0


class PromptDisagreement(Strategy):
    def __init__(self, segmenter: Callable[[], InteractiveSegmenter], max_images: int = 8):
        super().__init__("Unlabelled image where the current model's masks disagree most under slightly moved clicks")
        self._segmenter = segmenter
        self.max_images = max_images

    def __call__(self, request, datastore: Datastore) -> Optional[Dict]:
        images = sorted(datastore.get_unlabeled_images())
        if not images:
            return None
        segmenter = self._segmenter()
        model_key = segmenter.runtime.serving(segmenter.handle).key
        scored = []
        computed = 0
        for image_id in images:
            info = datastore.get_image_info(image_id) or {}
            entry = info.get(INFO_KEY)
            if not entry or entry.get("model") != model_key:
                if computed >= self.max_images:
                    continue
                t = time.time()
                score = disagreement(segmenter, datastore.get_image_uri(image_id), image_id)
                entry = {"score": round(score, 4), "model": model_key, "ts": int(time.time()), "seconds": round(time.time() - t, 1)}
                datastore.update_image_info(image_id, {INFO_KEY: entry})
                computed += 1
            scored.append((entry["score"], image_id))
        if not scored:
            return None
        score, image_id = max(scored)
        logger.info("uncertainty strategy: %s (disagreement %.3f) among %d scored", image_id, score, len(scored))
        return {"id": image_id, "uncertainty": score}

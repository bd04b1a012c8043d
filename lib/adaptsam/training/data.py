"""Training data from saved labels: every label value in a label map is one object.

No class list is needed: a clinician's final label with values {1, 2, 5} gives three objects.
Slices where an object covers at least `min_area` pixels (on the model's low-res grid), and
optionally at least `min_area_fraction` of its largest cross-section, become training samples;
3D windows are N consecutive slices around such a slice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..engine.preprocess import SliceGeometry, in_plane_axes, plane_shape, take_slice
from ..engine.volume import Volume

AXIAL = 2


@dataclass
class SliceSample:
    image_id: str
    index: int
    model_input: torch.Tensor  # (3, S, S) float16 in [0, 1]
    geom: SliceGeometry
    plane_label: np.ndarray  # (rows, cols) integer labels on the original grid
    low_res: Dict[int, torch.Tensor]  # object value -> (L, L) bool on the decoder's grid
    head: Optional[torch.Tensor] = None  # frozen activations entering the trained stage (the trainer caches them)

    @property
    def objects(self) -> List[int]:
        return list(self.low_res)


@dataclass
class VolumeSamples:
    image_id: str
    depth: int
    modality: str
    slices: Dict[int, SliceSample] = field(default_factory=dict)  # every slice (windows need neighbours)
    prompts: List[Dict] = field(default_factory=list)  # clinician prompts recorded at save time

    def recorded_clicks(self, k: int, value: int) -> List[Tuple[float, float, int]]:
        """Clinician clicks on axial slice k that belong to object `value`, in model-input
        coordinates as (x, y, 1 positive / 0 negative); empty when none were recorded."""
        sample = self.slices[k]
        found = []
        for prompt in self.prompts:
            fg = [c for c in prompt.get("foreground", []) if c[AXIAL] == k]
            bg = [c for c in prompt.get("background", []) if c[AXIAL] == k]
            r, c = in_plane_axes(AXIAL)
            if not any(sample.plane_label[p[r], p[c]] == value for p in fg):
                continue
            for clicks, positive in ((fg, 1), (bg, 0)):
                if clicks:
                    rc = np.array([[p[r], p[c]] for p in clicks])
                    for x, y in sample.geom.points_to_model(rc):
                        found.append((float(x), float(y), positive))
        return found


def load_pair(image_path: str, label_path: str, input_size: int, low_res: int, min_area: int, window_choice: str,
              min_area_fraction: float = 0.0) -> VolumeSamples:
    """A labelled volume's axial slices as the server shows them to the model (display
    orientation, model input size), CT in the window `window_choice` picks."""
    vol = Volume.load(image_path)
    lab = Volume.load(label_path, modality="MR").array
    if lab.shape != vol.shape:
        raise ValueError(f"label {Path(label_path).name} has shape {lab.shape}, image {Path(image_path).name} has {vol.shape}")
    lab = np.rint(lab).astype(np.int32)
    # CT: the server picks the soft-tissue window for organ names and the default otherwise;
    # train on both so either serves well.
    window = vol.window("liver" if window_choice == "soft" and vol.modality == "CT" else None)
    norm = vol.normalized(window)
    rows, cols = plane_shape(vol.shape, AXIAL)
    geom = SliceGeometry.fit(rows, cols, input_size, vol.plane_spacing(AXIAL), vol.display_flips(AXIAL))
    image_id = Path(image_path).name.split(".")[0]
    vs = VolumeSamples(image_id, vol.shape[AXIAL], vol.modality)
    for k in range(vol.shape[AXIAL]):
        x = geom.image_to_model(torch.from_numpy(take_slice(norm, AXIAL, k)).float() / 255.0).half()
        plane_label = take_slice(lab, AXIAL, k)
        objs = {}
        for v in np.unique(plane_label):
            if v == 0:
                continue
            m = geom.mask_to_model(torch.from_numpy((plane_label == v).astype(np.float32)), low_res)[0, 0] > 0.5
            if int(m.sum()) >= min_area:
                objs[int(v)] = m
        vs.slices[k] = SliceSample(image_id, k, x, geom, plane_label, objs)
    if min_area_fraction > 0:
        _keep_large_cross_sections(vs, min_area_fraction)
    return vs


def _keep_large_cross_sections(vs: VolumeSamples, fraction: float) -> None:
    """An organ's end slices, where partial volume leaves a sliver the label may or may not
    include, teach a click that the same tissue is sometimes a sliver, sometimes the organ:
    keep each object only where it covers `fraction` of its largest cross-section."""
    largest: Dict[int, int] = {}
    for sample in vs.slices.values():
        for v, m in sample.low_res.items():
            largest[v] = max(largest.get(v, 0), int(m.sum()))
    for sample in vs.slices.values():
        sample.low_res = {v: m for v, m in sample.low_res.items() if int(m.sum()) >= fraction * largest[v]}


def image_name(item: Dict) -> str:
    """How adapter files name a datalist item's image (training_images, images_seen)."""
    return Path(item["image"]).name


def split_by_image(items: Sequence[Dict], val_split: float, seed: int,
                   seen: Collection[str] = ()) -> Tuple[List[Dict], List[Dict]]:
    """Validation images are whole images, never slices of a training image. They are drawn from
    the images not in `seen` (file names the starting weights learnt from) while there are any:
    the gate compares the run's result with the version it started from, and on an image that
    version trained on it would be measured on its own training data. With fewer such images than
    the share asks for, fewer are held out (at least one)."""
    items = sorted(items, key=lambda d: d["image"])
    if len(items) < 2 or val_split <= 0:
        return list(items), []
    rng = random.Random(seed)
    shuffled = items[:]
    rng.shuffle(shuffled)
    n_val = min(len(items) - 1, max(1, int(round(val_split * len(items)))))
    unseen = [i for i, d in enumerate(shuffled) if image_name(d) not in seen]
    held = set((unseen or range(len(shuffled)))[:n_val])
    return [d for i, d in enumerate(shuffled) if i not in held], [d for i, d in enumerate(shuffled) if i in held]

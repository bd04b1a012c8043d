"""LiteMedSAM answers a box on real CT, on the original slice grid; untrained adapters change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samples
from adaptsam.engine.metrics import bounding_box, dice, largest_slice
from adaptsam.engine.predictor import SlicePredictor
from adaptsam.engine.preprocess import take_slice
from adaptsam.engine.volume import Volume
from adaptsam.model.adapters import AdapterConfig, attach_adapters
from adaptsam.model.backbones import build_model

AXIAL = 2


@pytest.fixture(scope="module")
def ct(samples_dir):
    vol = Volume.load(samples.image_path(samples_dir, "ct_dicom"))
    label, _, _ = samples.load_reference(samples_dir, "ct_dicom")
    return vol, label


def _box_case(ct, samples_dir, organ):
    vol, label = ct
    truth3d = label == samples.label_value(samples_dir, "ct_dicom", organ)
    k = largest_slice(truth3d, AXIAL)
    plane = take_slice(vol.normalized(vol.window(organ)), AXIAL, k)
    truth = take_slice(truth3d, AXIAL, k)
    return k, plane, truth, bounding_box(truth)


def _predict(model, plane, spacing, box, window=None):
    """Mask for `box`; with `window` (3d adapters) the slice is encoded amid its neighbours."""
    pred = SlicePredictor(model)
    geom = pred.geometry(plane, spacing)
    if window is None:
        emb = pred.embed(pred.model_input(plane, geom)[None])
    else:
        planes, centre = window
        stack = torch.stack([pred.model_input(p, geom) for p in planes])
        emb = pred.embed(stack)[centre : centre + 1]
    return pred.predict(emb, geom, box=box)


@pytest.mark.parametrize("organ", ["liver", "spleen"])
def test_box_dice_on_sample_ct(ct, samples_dir, base_model, organ):
    vol, _ = ct
    k, plane, truth, box = _box_case(ct, samples_dir, organ)
    result = _predict(base_model, plane, vol.plane_spacing(AXIAL), box)
    assert result.mask.shape == truth.shape == (512, 512)
    d = dice(result.mask, truth)
    print(f"{organ}: slice {k}, box {box}, Dice {d:.3f}, predicted IoU {result.iou:.3f}")
    assert d >= 0.95


@pytest.mark.parametrize("organ", ["liver", "spleen"])
def test_untrained_adapters_give_identical_masks(ct, samples_dir, base_model, organ):
    vol, _ = ct
    k, plane, truth, box = _box_case(ct, samples_dir, organ)
    spacing = vol.plane_spacing(AXIAL)
    expected = _predict(base_model, plane, spacing, box)

    adapted_2d = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d"))
    got_2d = _predict(adapted_2d, plane, spacing, box)
    assert np.array_equal(got_2d.mask, expected.mask)
    assert torch.equal(got_2d.low_res_logits, expected.low_res_logits)

    cfg = AdapterConfig(kind="3d", num_slices=5)
    adapted_3d = attach_adapters(build_model("litemedsam"), cfg)
    norm = vol.normalized(vol.window(organ))
    idx = np.clip(np.arange(k - 2, k + 3), 0, vol.shape[AXIAL] - 1)
    planes = [take_slice(norm, AXIAL, int(i)) for i in idx]
    # Same batch composition for both (a batch of 5 may round differently from a batch of 1).
    expected_3d = _predict(base_model, plane, spacing, box, window=(planes, 2))
    got_3d = _predict(adapted_3d, plane, spacing, box, window=(planes, 2))
    assert np.array_equal(got_3d.mask, expected_3d.mask)
    assert torch.equal(got_3d.low_res_logits, expected_3d.low_res_logits)
    assert dice(expected_3d.mask, expected.mask) > 0.999

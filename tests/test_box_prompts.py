"""LiteMedSAM answers a box on real CT, on the original slice grid; untrained adapters change nothing;
the served recipe answers a box alone with the base decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import samples
from adaptsam.engine.metrics import bounding_box, dice, largest_slice
from adaptsam.engine.models import ModelHandle
from adaptsam.engine.predictor import SlicePredictor
from adaptsam.engine.preprocess import take_slice
from adaptsam.engine.prompts import PromptPolicy, SlicePrompt, decode_slice
from adaptsam.engine.propagation import propagate
from adaptsam.engine.volume import Volume
from adaptsam.model import adapter_io
from adaptsam.model.adapters import AdapterConfig, attach_adapters
from adaptsam.model.backbones import build_model
from server_util import WEIGHTS

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


def test_a_box_alone_is_answered_by_the_base_decoder_a_click_by_the_adapted_one(ct, samples_dir, tmp_path):
    """The served recipe with the shipped 2D adapter: a box alone goes through the base model's
    decoder on the adapted embedding (engine/prompts.py); a click on the slice brings the decoder
    adapters in; the policy field turns the box path off for experiments, and so does a file the
    publish gate marked as answering boxes better through its own decoder."""
    vol, _ = ct
    k, plane, truth, box = _box_case(ct, samples_dir, "liver")
    serving = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu").current()
    assert serving.version > 0
    pred = SlicePredictor(serving.model)
    geom = pred.geometry(plane, vol.plane_spacing(AXIAL))
    emb = pred.embed(pred.model_input(plane, geom)[None])
    served = decode_slice(serving, emb, geom, SlicePrompt(box=box))
    assert torch.equal(served.low_res_logits, pred.predict(emb, geom, box=box, adapted_decoder=False).low_res_logits)
    adapted = decode_slice(serving, emb, geom, SlicePrompt(box=box), PromptPolicy(boxes_on_base_decoder=False))
    assert torch.equal(adapted.low_res_logits, pred.predict(emb, geom, box=box).low_res_logits)
    assert not torch.equal(adapted.low_res_logits, served.low_res_logits)
    r, c = np.argwhere(truth)[len(np.argwhere(truth)) // 2]
    clicked = decode_slice(serving, emb, geom, SlicePrompt(box=box, foreground=[(r, c)]))
    assert torch.equal(clicked.low_res_logits, pred.predict(emb, geom, box=box, foreground=[(r, c)]).low_res_logits)
    assert dice(served.mask, truth) > 0.9

    payload = adapter_io.read_adapter_file(serving.source)
    payload["meta"]["box_decoder"] = "adapted"
    marked = tmp_path / Path(serving.source).name
    adapter_io.write_adapter_file(marked, payload)
    serving_marked = ModelHandle("2d", "litemedsam", tmp_path, "cpu").current()
    assert serving.boxes_on_base_decoder and not serving_marked.boxes_on_base_decoder
    own = decode_slice(serving_marked, emb, geom, SlicePrompt(box=box))
    assert own.adapted_decoder and torch.equal(own.low_res_logits, adapted.low_res_logits)
    pinned = decode_slice(serving_marked, emb, geom, SlicePrompt(box=box), PromptPolicy(boxes_on_base_decoder=True))
    assert torch.equal(pinned.low_res_logits, served.low_res_logits)


def test_propagation_keeps_the_decoder_of_its_start_unless_a_user_clicked(ct, samples_dir):
    """A 3D box's slices are answered like its start (a box alone: the base decoder); a slice
    with the user's click on it, or a propagation started from a click, uses the adapters."""
    vol, label = ct
    truth3d = label == samples.label_value(samples_dir, "ct_dicom", "liver")
    k = largest_slice(truth3d, AXIAL)
    serving = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu").current()
    pred = SlicePredictor(serving.model)
    norm = vol.normalized(vol.window("liver"))
    geom = pred.geometry(take_slice(norm, AXIAL, k), vol.plane_spacing(AXIAL))
    embeddings = {}

    def embed(s, step=0):
        if s not in embeddings:
            embeddings[s] = pred.embed(pred.model_input(take_slice(norm, AXIAL, s), geom)[None])
        return embeddings[s]

    r0, c0, r1, c1 = bounding_box(take_slice(truth3d, AXIAL, k))
    roi = [(r0, r1), (c0, c1), (k - 2, k + 2)]
    box_of = lambda roi: (roi[0][0], roi[1][0], roi[0][1], roi[1][1])
    start = decode_slice(serving, embed(k), geom, SlicePrompt(box=(r0, c0, r1, c1)))
    assert not start.adapted_decoder
    inside = np.argwhere(take_slice(truth3d, AXIAL, k + 1))
    click = tuple(int(v) for v in inside[len(inside) // 2])
    preds = propagate(serving, embed, geom, vol.shape[AXIAL], k, start, roi, AXIAL, box_of, {k + 1: ([click], [])})
    assert sorted(preds) == [k - 2, k - 1, k + 1, k + 2]
    assert [preds[s].adapted_decoder for s in sorted(preds)] == [False, False, True, False]
    b = bounding_box(start.mask)
    clipped = (max(b[0], r0), max(b[1], c0), min(b[2], r1), min(b[3], c1))  # within the 3D box
    expected = pred.predict(embed(k - 1), geom, box=clipped, mask_input=start.low_res_logits, adapted_decoder=False)
    assert torch.equal(preds[k - 1].low_res_logits, expected.low_res_logits)

    from_click = decode_slice(serving, embed(k), geom, SlicePrompt(foreground=[click]))
    assert from_click.adapted_decoder
    assert all(p.adapted_decoder for p in propagate(serving, embed, geom, vol.shape[AXIAL], k, from_click, roi, AXIAL, box_of, {}).values())

"""How a correction click is decoded: with or without the previous answer's logits as mask prompt,
with the clicks carved into them (engine/click_carving.py) and with the guide box
(engine/guide_box.py).

In-process on the shipped 2D adapter and the real sample CT (the server wraps exactly this
InteractiveSegmenter; PromptPolicy's fields switch the pieces off for comparison).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samples
from adaptsam.engine.click_carving import carve_clicks
from adaptsam.evaluation.clicks import correction_click, interior_point
from adaptsam.engine.first_click import answer_lone_click
from adaptsam.engine.guide_box import guide_box
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime
from adaptsam.engine.request import SegmentRequest
from adaptsam.engine.metrics import bounding_box, dice, largest_slice
from adaptsam.engine.models import ModelHandle
from adaptsam.engine.predictor import SlicePredictor
from adaptsam.engine.prompts import PromptPolicy
from adaptsam.engine.preprocess import in_plane_axes, take_slice, voxel_to_plane
from server_util import WEIGHTS

IMAGE = "ct_dicom"


@pytest.fixture(scope="module")
def runtime():
    rt = Runtime(1 << 30)
    yield rt
    rt.encoder.stop()


def _session(runtime, samples_dir, carry, guide=False, carve=True):
    """A click on the liver's largest slice, then one protocol correction in the same session,
    and the same two clicks sent fresh by another client; returns the three answers and the truth
    on that slice. (A session continues from clicks only: a box is always decoded afresh.)"""
    handle = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu")  # the shipped 2D adapter
    seg = InteractiveSegmenter(runtime, handle, PromptPolicy(carry_logits=carry, guide_box=guide, carve_clicks=carve), propagate=False)
    truth = samples.structure_mask(samples_dir, IMAGE, "liver")
    k = largest_slice(truth)
    truth = truth[:, :, k]
    base = dict(image_path=str(samples.image_path(samples_dir, IMAGE)), image_id=IMAGE, label="liver", mode="slice")
    click = [*interior_point(truth), k]
    client = f"{carry}{guide}{carve}"
    first = seg.segment(SegmentRequest(**base, foreground=[click], client_id=f"a{client}", reset=True)).label[:, :, k] > 0
    i, j, positive = correction_click(first, truth)
    fg, bg = [click], []
    (fg if positive else bg).append([int(i), int(j), k])
    continued = seg.segment(SegmentRequest(**base, foreground=fg, background=bg, client_id=f"a{client}")).label[:, :, k] > 0
    fresh = seg.segment(SegmentRequest(**base, foreground=fg, background=bg, client_id=f"b{client}", reset=True)).label[:, :, k] > 0
    return first, continued, fresh, truth, (seg, base, k, fg, bg)


def test_without_carried_logits_a_correction_is_decoded_from_the_clicks_alone(runtime, samples_dir):
    first, continued, fresh, truth, _ = _session(runtime, samples_dir, carry=False)
    print(f"no carry: 1 click {dice(first, truth):.3f} -> 2 clicks {dice(continued, truth):.3f}")
    assert np.array_equal(continued, fresh)  # the session adds nothing to the clicks


def test_carried_logits_make_the_session_matter(runtime, samples_dir):
    # the default: the shipped adapters were trained so (ServingModel.carries_logits)
    first, continued, fresh, truth, _ = _session(runtime, samples_dir, carry=True)
    print(f"carry: 1 click {dice(first, truth):.3f} -> 2 clicks {dice(continued, truth):.3f} in session, "
          f"{dice(fresh, truth):.3f} sent fresh")
    assert not np.array_equal(continued, fresh)


def test_a_correction_click_also_sends_the_guide_box(runtime, samples_dir):
    # the server's default: the previous answer's box, widened to take the positive clicks
    first, continued, fresh, truth, (seg, base, k, fg, bg) = _session(runtime, samples_dir, carry=True, guide=True)
    _, unguided, _, _, _ = _session(runtime, samples_dir, carry=True, guide=False)
    print(f"guide: 1 click {dice(first, truth):.3f} -> 2 clicks {dice(continued, truth):.3f} "
          f"(without the guide box {dice(unguided, truth):.3f})")
    assert not np.array_equal(continued, unguided)

    # the same two decoder passes by hand, on the slice as the server sees it
    serving = runtime.serving(seg.handle)
    vol, key = runtime.volumes.get(base["image_path"], base["image_id"])
    emb, _ = runtime.encoder.embedding(serving, vol, key, 2, k, vol.window("liver"))
    geom = runtime.encoder.geometry(serving, vol, 2)
    predictor = SlicePredictor(serving.model)
    pfg = [voxel_to_plane(c, 2)[1:] for c in fg]
    pbg = [voxel_to_plane(c, 2)[1:] for c in bg]
    one = answer_lone_click(predictor, emb, geom, pfg[0])  # the first click, through boxes around it
    plane_first = take_slice(first[:, :, None], 2, 0)
    assert np.array_equal(one.mask, plane_first)
    box = guide_box(one.mask, pfg)
    r0, c0, r1, c1 = bounding_box(one.mask)
    assert box[0] <= r0 and box[1] <= c0 and box[2] >= r1 and box[3] >= c1  # it holds the previous answer
    for r, c in pfg:  # ... and every positive click, with room around it
        assert box[0] < r < box[2] and box[1] < c < box[3]
    carved = carve_clicks(one.low_res_logits, geom, pfg, pbg)
    assert not torch.equal(carved, one.low_res_logits)
    two = predictor.predict(emb, geom, box=box, foreground=pfg, background=pbg, mask_input=carved)
    assert np.array_equal(two.mask, take_slice(continued[:, :, None], 2, 0))
    # without carving: the previous logits go back as they were
    _, uncarved, _, _, _ = _session(runtime, samples_dir, carry=True, guide=True, carve=False)
    plain = predictor.predict(emb, geom, box=box, foreground=pfg, background=pbg, mask_input=one.low_res_logits)
    assert np.array_equal(plain.mask, take_slice(uncarved[:, :, None], 2, 0))

    # a box of the user's own replaces the guide box (the carved logits stay)
    i0, j0, i1, j1 = bounding_box(truth)
    roi = [i0, i1, j0, j1, k, k]
    seg.segment(SegmentRequest(**base, foreground=fg[:1], client_id="d", reset=True))
    with_roi = seg.segment(SegmentRequest(**base, foreground=fg, background=bg, roi=roi, client_id="d")).label[:, :, k] > 0
    ranges = {0: (i0, i1), 1: (j0, j1)}
    row_axis, col_axis = in_plane_axes(2)
    plane_box = (ranges[row_axis][0], ranges[col_axis][0], ranges[row_axis][1], ranges[col_axis][1])
    by_hand = predictor.predict(emb, geom, box=plane_box, foreground=pfg, background=pbg, mask_input=carved).mask
    inside = np.zeros_like(by_hand)
    inside[plane_box[0] : plane_box[2] + 1, plane_box[1] : plane_box[3] + 1] = True
    assert np.array_equal(by_hand & inside, take_slice(with_roi[:, :, None], 2, 0))


@pytest.mark.slow
def test_carving_makes_the_answer_follow_the_correction_clicks(runtime, samples_dir):
    """Every object of the held-out CT's silver label (>= 150 px on its largest slice), four
    protocol corrections each through the server's session path: how often the clicked pixel
    ends up as the click says, with the clicks carved into the carried logits and without.
    Without, the decoder follows the previous answer and ignores most corrections (negative
    clicks almost all: 2 of 48 measured)."""
    handle = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu")
    label, _, names = samples.load_reference(samples_dir, IMAGE)
    path = str(samples.image_path(samples_dir, IMAGE))
    honoured = {True: [0, 0], False: [0, 0]}
    for carve in (True, False):
        seg = InteractiveSegmenter(runtime, handle, PromptPolicy(carve_clicks=carve), propagate=False)
        for value, name in sorted(names.items()):
            truth3d = label == value
            if not truth3d.any():
                continue
            k = largest_slice(truth3d)
            truth = truth3d[:, :, k]
            if truth.sum() < 150:
                continue
            base = dict(image_path=path, image_id=IMAGE, label=name, mode="slice", client_id=f"h{carve}{name}")
            fg, bg = [[*interior_point(truth), k]], []
            answer = seg.segment(SegmentRequest(**base, foreground=fg, reset=True)).label[:, :, k] > 0
            for _ in range(4):
                c = correction_click(answer, truth)
                if c is None:
                    break
                (fg if c[2] else bg).append([c[0], c[1], k])
                answer = seg.segment(SegmentRequest(**base, foreground=fg, background=bg)).label[:, :, k] > 0
                honoured[carve][0] += int(bool(answer[c[0], c[1]]) == c[2])
                honoured[carve][1] += 1
    rate = {carve: h / n for carve, (h, n) in honoured.items()}
    print(f"corrections honoured: carved {honoured[True]}, plain {honoured[False]}")
    assert honoured[True][1] >= 60 and honoured[False][1] >= 60
    assert rate[True] >= rate[False] + 0.25

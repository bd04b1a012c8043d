"""Negative clicks alone on a slice (engine/rejection.py): the region they reject goes, and a
slice whose main region was rejected ends the object on the side away from the positive clicks.

In-process on the shipped 2D adapter and the real 3 mm MR sample, where one click on the spleen
propagates past the spleen's lower end (nothing on those slices says it ended).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import samples
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime
from adaptsam.engine.metrics import dice
from adaptsam.engine.models import ModelHandle
from adaptsam.engine.rejection import main_region_rejected, slices_after_rejection
from adaptsam.engine.request import SegmentRequest
from adaptsam.evaluation.clicks import interior_point, interior_voxel
from server_util import WEIGHTS

IMAGE = "mr_3mm"


def test_an_emptied_slice_cuts_off_only_the_side_without_positive_clicks():
    assert slices_after_rejection(5, 10, positive_slices=[8], clicked_slices=[8, 5]) == [4, 3, 2, 1, 0]
    assert slices_after_rejection(5, 10, positive_slices=[2], clicked_slices=[2, 5, 8]) == [6, 7]  # up to a clicked slice
    assert slices_after_rejection(5, 10, positive_slices=[2, 8], clicked_slices=[2, 5, 8]) == []  # the object goes on past it
    assert slices_after_rejection(5, 10, positive_slices=[], clicked_slices=[5]) == []
    assert slices_after_rejection(5, 10, positive_slices=[5], clicked_slices=[5]) == []


def test_only_the_loss_of_the_main_region_ends_the_object():
    previous = np.zeros((20, 20), bool)
    previous[2:12, 2:12] = True  # the main region
    previous[15:18, 15:18] = True  # an island
    island_gone = previous.copy()
    island_gone[15:18, 15:18] = False
    assert not main_region_rejected(previous, island_gone, [(16, 16)])  # a rejected island cuts nothing
    trimmed = previous.copy()
    trimmed[2:6, 2:12] = False
    assert not main_region_rejected(previous, trimmed, [(3, 5)])  # nor does a trimmed main region
    main_gone = previous & ~island_gone
    assert main_region_rejected(previous, main_gone, [(6, 6)])
    assert main_region_rejected(previous, np.zeros_like(previous), [(16, 16)])  # nothing left


@pytest.fixture(scope="module")
def spleen(samples_dir):
    rt = Runtime(1 << 30)
    seg = InteractiveSegmenter(rt, ModelHandle("2d", "litemedsam", WEIGHTS, "cpu"))  # the shipped 2D adapter
    truth = samples.structure_mask(samples_dir, IMAGE, "spleen")
    base = dict(image_path=str(samples.image_path(samples_dir, IMAGE)), image_id=IMAGE, label="spleen")
    yield seg, base, truth
    rt.stop()


def test_a_negative_click_past_the_object_clears_that_slice_and_the_ones_beyond(spleen):
    seg, base, truth = spleen
    click = list(interior_voxel(truth))
    first = seg.segment(SegmentRequest(**base, foreground=[click], mode="volume", client_id="a", reset=True)).label > 0
    answered = np.nonzero(first.any((0, 1)))[0]
    present = np.nonzero(truth.any((0, 1)))[0]
    past = [s for s in answered if s < present.min()]  # slices answered below the spleen's lower end
    assert past, f"the answer {answered.min()}-{answered.max()} stays within the spleen's slices {present.min()}-{present.max()}"
    k = past[len(past) // 2]
    r, c = interior_point(first[:, :, k])  # in the slice's main region: the clicks' protocol picks that point
    out = seg.segment(SegmentRequest(**base, foreground=[click], background=[[r, c, k]], mode="slice", slice_index=k, client_id="a")).label > 0
    print(f"spleen slices {present.min()}-{present.max()}, answered {answered.min()}-{answered.max()}; negative click on slice {k}: "
          f"Dice {dice(first, truth):.3f} -> {dice(out, truth):.3f}, answered slices now "
          f"{np.nonzero(out.any((0, 1)))[0].min()}-{np.nonzero(out.any((0, 1)))[0].max()}")
    regions, _ = ndimage.label(first[:, :, k])
    assert not (out[:, :, k] & (regions == regions[r, c])).any()  # the region clicked on went as a whole
    assert not out[:, :, :k].any()  # and what was propagated from it, away from the positive click
    assert np.array_equal(out[:, :, k + 1 :], first[:, :, k + 1 :])  # the side with the click is untouched
    assert dice(out, truth) > dice(first, truth)


    # dropping the negative click gives back the answer before it, the cleared slices included
    back = seg.segment(SegmentRequest(**base, foreground=[click], mode="slice", slice_index=click[2], client_id="a")).label > 0
    assert np.array_equal(back, first)

"""A correction that grows the answer on its slice carries to the neighbouring slices while it keeps
growing them (engine/carry.py): the rule on masks, then on the real 3 mm MR's colon through the
shipped 2D adapter, against the same session with carrying switched off.
"""

from __future__ import annotations

import numpy as np
import pytest

import samples
from adaptsam.engine.carry import CarryPolicy, grew
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime
from adaptsam.engine.models import ModelHandle
from adaptsam.engine.request import SegmentRequest
from adaptsam.evaluation.clicks import correction_voxel, interior_voxel
from adaptsam.evaluation.metrics import dice
from server_util import WEIGHTS

IMAGE = "mr_3mm"


def test_grew_asks_for_the_old_answer_kept_and_a_larger_one():
    old = np.zeros((40, 40), bool)
    old[10:20, 10:20] = True  # 100 px
    policy = CarryPolicy(enabled=True)
    bigger = old.copy()
    bigger[10:20, 20:25] = True  # 150 px holding all of it
    assert grew(old, bigger, policy)
    assert not grew(old, old, policy)  # the same answer: nothing to carry
    moved = np.zeros_like(old)
    moved[14:26, 14:26] = True  # 144 px holding 36 of the old 100
    assert not grew(old, moved, policy)
    trimmed = bigger.copy()
    trimmed[10:12, 10:20] = False  # larger, but 20 of the old 100 gone
    assert not grew(old, trimmed, policy)
    assert not grew(np.zeros_like(old), bigger, policy)  # nothing there before: the object may have ended


@pytest.fixture(scope="module")
def colon(samples_dir):
    rt = Runtime(1 << 30)
    handle = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu")  # the shipped 2D adapter
    segmenters = {on: InteractiveSegmenter(rt, handle, carry=CarryPolicy(enabled=on)) for on in (True, False)}
    truth = samples.structure_mask(samples_dir, IMAGE, "colon")
    base = dict(image_path=str(samples.image_path(samples_dir, IMAGE)), image_id=IMAGE, label="colon")
    yield segmenters, base, truth
    rt.stop()


def test_a_growing_correction_grows_the_neighbouring_slices_and_undo_takes_it_back(colon):
    segmenters, base, truth = colon
    click = list(interior_voxel(truth))
    answers = {}
    for on, seg in segmenters.items():
        first = seg.segment(SegmentRequest(**base, foreground=[click], mode="volume", client_id=f"c{on}", reset=True)).label > 0
        answers[on] = first
    assert np.array_equal(answers[True], answers[False])  # a first click carries nothing
    first = answers[True]
    i, j, k, positive = correction_voxel(first, truth)
    assert positive, "the protocol's first correction on the colon adds to the answer"
    out = {on: seg.segment(SegmentRequest(**base, foreground=[click, [i, j, k]], mode="slice", slice_index=k,
                                          client_id=f"c{on}")).label > 0 for on, seg in segmenters.items()}
    changed = [s for s in range(first.shape[2]) if s != k and not np.array_equal(out[True][:, :, s], first[:, :, s])]
    print(f"colon: one click {dice(first, truth):.3f}; a correction on slice {k}: {dice(out[False], truth):.3f} on its slice "
          f"alone, {dice(out[True], truth):.3f} carried to slices {changed}")
    # without carrying only the clicked slice changes; with it the answer there is the same
    assert all(np.array_equal(out[False][:, :, s], first[:, :, s]) for s in range(first.shape[2]) if s != k)
    assert np.array_equal(out[True][:, :, k], out[False][:, :, k])
    assert changed, "the grown correction reached no neighbour"
    # one contiguous run of slices through the corrected one, each grown from what it had
    run = sorted(changed + [k])
    assert run == list(range(run[0], run[-1] + 1))
    for s in changed:
        old, new = first[:, :, s], out[True][:, :, s]
        assert (old & new).sum() >= 0.9 * old.sum() and new.sum() > old.sum()
    assert dice(out[True], truth) > dice(out[False], truth)
    assert click[2] not in changed  # the slice of the first click has a click of its own: the walk stops there

    # dropping the correction gives back the first answer, the carried slices included
    back = segmenters[True].segment(SegmentRequest(**base, foreground=[click], mode="slice", slice_index=click[2],
                                                   client_id="cTrue")).label > 0
    assert np.array_equal(back, first)

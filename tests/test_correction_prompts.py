"""How a correction click is decoded: with or without the previous answer's logits as mask prompt.

In-process on the shipped 2D adapter and the real sample CT (the server wraps exactly this
InteractiveSegmenter; `--conf carry_logits` sets the switch).
"""

from __future__ import annotations

import numpy as np
import pytest

from adaptsam import samples
from adaptsam.engine.click_protocol import correction_click
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime, SegmentRequest
from adaptsam.engine.metrics import dice, largest_slice
from adaptsam.engine.models import ModelHandle
from adaptsam.model.backbones import default_weights_dir

IMAGE = "ct_dicom"


@pytest.fixture(scope="module")
def runtime():
    rt = Runtime(1 << 30)
    yield rt
    rt.encoder.stop()


def _session(runtime, samples_dir, carry):
    """A click on the liver's largest slice, then one protocol correction in the same session,
    and the same two clicks sent fresh by another client; returns the three answers and the truth
    on that slice. (A session continues from clicks only: a box is always decoded afresh.)"""
    from adaptsam.engine.click_protocol import interior_point

    handle = ModelHandle("2d", "litemedsam", default_weights_dir(), "cpu")  # the shipped 2D adapter
    seg = InteractiveSegmenter(runtime, handle, propagate=False, carry_logits=carry)
    label, _, _ = samples.load_reference(samples_dir, IMAGE)
    truth = label == samples.label_value(samples_dir, IMAGE, "liver")
    k = largest_slice(truth)
    truth = truth[:, :, k]
    base = dict(image_path=str(samples.image_path(samples_dir, IMAGE)), image_id=IMAGE, label="liver", mode="slice")
    click = [*interior_point(truth), k]
    first = seg.segment(SegmentRequest(**base, foreground=[click], client_id=f"a{carry}", reset=True)).label[:, :, k] > 0
    i, j, positive = correction_click(first, truth)
    fg, bg = [click], []
    (fg if positive else bg).append([int(i), int(j), k])
    continued = seg.segment(SegmentRequest(**base, foreground=fg, background=bg, client_id=f"a{carry}")).label[:, :, k] > 0
    fresh = seg.segment(SegmentRequest(**base, foreground=fg, background=bg, client_id=f"b{carry}", reset=True)).label[:, :, k] > 0
    return first, continued, fresh, truth


def test_without_carried_logits_a_correction_is_decoded_from_the_clicks_alone(runtime, samples_dir):
    first, continued, fresh, truth = _session(runtime, samples_dir, carry=False)
    print(f"no carry: 1 click {dice(first, truth):.3f} -> 2 clicks {dice(continued, truth):.3f}")
    assert np.array_equal(continued, fresh)  # the session adds nothing to the clicks


def test_carried_logits_make_the_session_matter(runtime, samples_dir):
    # the default: the shipped adapters were trained so (ServingModel.carries_logits)
    first, continued, fresh, truth = _session(runtime, samples_dir, carry=True)
    print(f"carry: 1 click {dice(first, truth):.3f} -> 2 clicks {dice(continued, truth):.3f} in session, "
          f"{dice(fresh, truth):.3f} sent fresh")
    assert not np.array_equal(continued, fresh)

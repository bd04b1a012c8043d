"""The model sees every slice in radiological display orientation, whatever the storage order.

The same CT stored twice, as DICOM's LPS order gives it and turned to RAS order (as NIfTI
converters often write it: both in-plane axes reversed, the affine saying so), must give the
model the same picture and the client the same answer on the same anatomy.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import samples
from adaptsam.engine.interactive import InteractiveSegmenter, Runtime
from adaptsam.engine.request import SegmentRequest
from adaptsam.engine.metrics import largest_slice
from adaptsam.evaluation.clicks import interior_point
from adaptsam.engine.models import ModelHandle
from adaptsam.engine.preprocess import SliceGeometry, display_flips
from adaptsam.engine.volume import Volume
from server_util import WEIGHTS

IMAGE = "ct_dicom"
LPS_AFFINE = np.diag([-1.0, -1.0, 2.0, 1.0])  # voxel axes run to the patient's left, back, head
RAS_AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])


def test_display_flips_per_storage_order_and_plane():
    # axial (normal to k): rows follow j, columns follow i
    assert display_flips(LPS_AFFINE, 2) == (False, False)  # front at the top, left on the right
    assert display_flips(RAS_AFFINE, 2) == (True, True)
    # coronal and sagittal: rows follow k, which runs to the head: turned head up
    assert display_flips(LPS_AFFINE, 1) == (True, False)
    assert display_flips(LPS_AFFINE, 0) == (True, False)
    # an oblique axis follows the world axis it runs closest to
    tilt = LPS_AFFINE.copy()
    tilt[:3, 0] = [-0.9, 0.3, 0.1]
    assert display_flips(tilt, 2) == (False, False)


@pytest.mark.parametrize("flips", [(True, False), (False, True), (True, True)])
def test_flipped_geometry_maps_prompts_and_logits_like_the_flipped_picture(flips):
    rows, cols = 101, 122
    plain = SliceGeometry.fit(rows, cols, 256, (3.0, 3.0))
    turned = SliceGeometry.fit(rows, cols, 256, (3.0, 3.0), flips)
    plane = torch.rand(rows, cols)
    flipped_plane = torch.flip(plane, [d for d, f in zip((0, 1), flips) if f])
    # the model sees the flipped picture ...
    assert torch.equal(turned.image_to_model(plane), plain.image_to_model(flipped_plane))
    # ... a click lands on the same tissue in it ...
    r, c = 30, 100
    fr, fc = (rows - 1 - r if flips[0] else r), (cols - 1 - c if flips[1] else c)
    np.testing.assert_allclose(turned.points_to_model(np.array([[r, c]])), plain.points_to_model(np.array([[fr, fc]])))
    box = turned.box_to_model(10, 20, 40, 60)
    fr0, fr1 = (rows - 1 - 40, rows - 1 - 10) if flips[0] else (10, 40)
    fc0, fc1 = (cols - 1 - 60, cols - 1 - 20) if flips[1] else (20, 60)
    np.testing.assert_allclose(box, plain.box_to_model(fr0, fc0, fr1, fc1))
    # ... and its logits come back onto the stored grid
    logits = torch.randn(1, 1, 256, 256)
    back = turned.logits_to_plane(logits[0, 0])
    assert torch.equal(back, torch.flip(plain.logits_to_plane(logits[0, 0]), [d for d, f in zip((0, 1), flips) if f]))
    mask = (plane > 0.5).float()
    assert torch.equal(turned.mask_to_model(mask, 256), plain.mask_to_model(torch.flip(mask, [d for d, f in zip((0, 1), flips) if f]), 256))


def test_a_wider_field_shows_the_slice_smaller():
    own = SliceGeometry.fit(122, 101, 256, (3.0, 3.0))
    wide = SliceGeometry.fit(122, 101, 256, (3.0, 3.0), min_field=500.0)
    assert own.new_rows == 256
    assert wide.new_rows == round(366 / 500 * 256) and wide.new_cols == round(303 / 500 * 256)
    assert SliceGeometry.fit(122, 101, 256, (3.0, 3.0), min_field=100.0) == own  # never larger than its own


@pytest.fixture(scope="module")
def runtime():
    rt = Runtime(1 << 30)
    yield rt
    rt.encoder.stop()


def test_the_same_ct_stored_lps_or_ras_gets_the_same_answer(runtime, samples_dir, tmp_path):
    src = samples.image_path(samples_dir, IMAGE)
    vol = Volume.load(src)
    assert vol.display_flips(2) == (False, False)
    ni, nj, _ = vol.shape
    # RAS storage: i and j reversed, the affine moved so every voxel keeps its place in the world
    reverse = np.array([[-1, 0, 0, ni - 1], [0, -1, 0, nj - 1], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)
    ras = tmp_path / "ct_ras.nii.gz"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(vol.array[::-1, ::-1, :]), vol.affine @ reverse), str(ras))
    assert nib.aff2axcodes(nib.load(str(ras)).affine)[:2] == ("R", "A")
    assert Volume.load(ras).display_flips(2) == (True, True)

    truth = samples.structure_mask(samples_dir, IMAGE, "liver")
    k = largest_slice(truth)
    i, j = interior_point(truth[:, :, k])
    handle = ModelHandle("2d", "litemedsam", WEIGHTS, "cpu")
    seg = InteractiveSegmenter(runtime, handle, propagate=False)
    answers = {}
    for name, path, click in (("lps", src, [i, j, k]), ("ras", ras, [ni - 1 - i, nj - 1 - j, k])):
        req = SegmentRequest(str(path), name, label="liver", mode="slice", foreground=[click], client_id=name)
        answers[name] = seg.segment(req).label[:, :, k] > 0
    assert answers["lps"].sum() > 1000
    assert np.array_equal(answers["ras"][::-1, ::-1], answers["lps"])

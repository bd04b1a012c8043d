"""Slice geometry and intensities: prompts forward and logits back are exact inverses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import samples

from adaptsam.engine.preprocess import (
    CT_DEFAULT_WINDOW,
    CT_WINDOW_PRESETS,
    SliceGeometry,
    ct_window_for,
    intensity_window,
    normalize_volume,
    put_slice,
    take_slice,
    voxel_to_plane,
)


@pytest.mark.parametrize(
    "rows,cols,spacing,expected",
    [
        ((512, 512), (256, 256), (1.0, 1.0), None),
        ((101, 122), (212, 256), (1.0, 1.0), None),
        ((20, 100), (154, 256), (3.0, 1.0), "physical aspect kept, not voxel aspect"),
    ],
)
def test_fit_keeps_aspect_ratio(rows, cols, spacing, expected):
    geom = SliceGeometry.fit(rows[0], rows[1], 256, spacing)
    assert (geom.new_rows, geom.new_cols) == cols


def _edge_plane(rows, cols, edge_col, edge_row):
    plane = np.zeros((rows, cols), dtype=np.float32)
    plane[edge_row:, edge_col:] = 1.0
    return plane


@pytest.mark.parametrize("shape,spacing", [((512, 512), (1, 1)), ((101, 122), (1, 1)), ((30, 90), (3, 1)), ((300, 200), (1, 1))])
def test_logits_map_back_without_shift_or_distortion(shape, spacing):
    rows, cols = shape
    geom = SliceGeometry.fit(rows, cols, 256, spacing)
    plane = _edge_plane(rows, cols, cols // 3, rows // 2)
    model_in = geom.image_to_model(torch.from_numpy(plane))
    assert model_in.shape == (3, 256, 256)
    assert float(model_in[:, geom.new_rows :, :].abs().sum()) == 0  # padding below
    assert float(model_in[:, :, geom.new_cols :].abs().sum()) == 0  # padding right
    # the model-space picture read as logits (centred at 0) and mapped back to the slice
    logits = (model_in[0] - 0.5)[None, None]
    for low_res in (logits, torch.nn.functional.interpolate(logits, (64, 64), mode="area")):
        back = geom.logits_to_plane(low_res[0, 0]).numpy() > 0
        assert back.shape == (rows, cols)
        mismatched = back != (plane > 0.5)
        # only pixels on the two edges may flip, and the edges stay where they were
        assert mismatched.sum() <= rows + cols
        assert np.array_equal(back[rows // 2 + 2 :, : cols // 3 - 2], np.zeros_like(back[rows // 2 + 2 :, : cols // 3 - 2]))
        assert back[rows // 2 + 2 :, cols // 3 + 2 :].all()


def test_points_and_boxes_follow_the_image():
    geom = SliceGeometry.fit(101, 122, 256)
    plane = np.zeros((101, 122), np.float32)
    r, c = 40, 90
    plane[r - 1 : r + 2, c - 1 : c + 2] = 1
    model_in = geom.image_to_model(torch.from_numpy(plane))[0].numpy()
    x, y = geom.points_to_model(np.array([[r, c]]))[0]
    # the mapped point (after SAM's +0.5 centre shift) sits on the resized blob's centre of mass
    yy, xx = np.nonzero(model_in > 0.01)
    w = model_in[yy, xx]
    assert abs((xx * w).sum() / w.sum() - x) < 0.5 and abs((yy * w).sum() / w.sum() - y) < 0.5
    box = geom.box_to_model(10, 20, 60, 100)
    np.testing.assert_allclose(box, [20 * geom.scale_cols, 10 * geom.scale_rows, 100 * geom.scale_cols, 60 * geom.scale_rows])


def test_mask_prompt_lands_on_the_low_res_grid():
    geom = SliceGeometry.fit(512, 256, 256)  # new size 256 x 128
    plane = np.zeros((512, 256), np.float32)
    plane[256:, 128:] = 1
    low = geom.mask_to_model(torch.from_numpy(plane), 64)[0, 0].numpy()
    assert low.shape == (64, 64)
    assert low[:, 32:].sum() == 0  # right padding (model width 128 of 256 -> 32 of 64)
    assert low[40:, 20:30].min() > 0.99 and low[:28, :].max() < 0.01


def test_slices_and_voxel_indices_agree():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    for axis in range(3):
        for voxel in ([1, 2, 3], [3, 4, 5], [0, 0, 0]):
            index, row, col = voxel_to_plane(voxel, axis)
            assert take_slice(vol, axis, index)[row, col] == vol[tuple(voxel)]
        out = np.zeros_like(vol)
        put_slice(out, axis, 2, take_slice(vol, axis, 2))
        assert np.array_equal(np.take(out, 2, axis=axis), np.take(vol, 2, axis=axis))


def test_intensity_windows():
    assert ct_window_for("liver") == CT_WINDOW_PRESETS["soft_tissue"]
    assert ct_window_for("rib_left_3") == CT_WINDOW_PRESETS["bone"]
    assert ct_window_for("lung_upper_lobe_left") == CT_WINDOW_PRESETS["lung"]
    assert ct_window_for(None) == ct_window_for("something else") == CT_DEFAULT_WINDOW
    ct = np.array([-1000, -500, 0, 1000, 3000], np.float32)
    assert normalize_volume(ct, CT_DEFAULT_WINDOW).tolist() == [0, 0, 85, 255, 255]
    rng = np.random.default_rng(0)
    mr = np.concatenate([np.zeros(1000), rng.uniform(10, 20, 100000), [5000.0]])
    lo, hi = intensity_window(mr, "MR")
    assert 10 <= lo < 10.1 and 19.9 < hi <= 20  # background zeros and the bright outlier ignored


def test_volume_load_reads_gzipped_nifti_exactly_and_refuses_truncated_files(samples_dir, tmp_path):
    """The fast gzip path (ISA-L) gives nibabel's voxels, dtype and affine; a cut-off or
    non-gzip upload is a load error the server turns into a 4xx."""
    import nibabel as nib

    from adaptsam.engine.volume import ImageLoadError, Volume

    path = samples.image_path(samples_dir, "ct_dicom")
    vol = Volume.load(path)
    ref = nib.load(str(path))
    expected = np.asanyarray(ref.dataobj)
    assert vol.array.dtype == expected.dtype and np.array_equal(vol.array, expected)
    assert np.allclose(vol.affine, ref.affine)
    # a slice is a view of the loaded array, laid out as take_slice documents
    plane = take_slice(vol.array, 2, 7)
    assert np.shares_memory(plane, vol.array) and plane.shape == (expected.shape[1], expected.shape[0])
    assert plane[5, 3] == expected[3, 5, 7]

    data = path.read_bytes()
    for name, content in (("cut.nii.gz", data[: len(data) // 2]), ("text.nii.gz", b"not an image")):
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(ImageLoadError):
            Volume.load(bad)

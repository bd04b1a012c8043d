"""A loaded image volume indexed exactly as MONAI Label clients index it.

Slicer and OHIF send clicks as voxel indices [i, j, k] of the image as stored (ITK IJK);
nibabel's array for NIfTI and SimpleITK's array transposed to (i, j, k) for other formats
both index that way, and no reorientation is applied to the data, so a click lands on the voxel
the user saw (the model is shown each slice in display orientation through SliceGeometry's flips,
and everything it answers is mapped back).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .errors import NotFound, RequestError
from .preprocess import display_flips, guess_modality, in_plane_axes, intensity_window, normalize_volume, take_slice

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class ImageLoadError(ValueError):
    pass


@dataclass
class Volume:
    array: np.ndarray  # (I, J, K) as stored
    affine: np.ndarray  # voxel -> RAS (4x4)
    path: str = ""
    modality: str = ""
    _mr_window: Optional[Tuple[float, float]] = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path, modality: Optional[str] = None) -> "Volume":
        path = Path(path)
        try:
            if path.name.endswith(NIFTI_SUFFIXES):
                array, affine = _load_nifti(path)
            else:
                array, affine = _load_itk(path)
        except Exception as e:  # corrupt or unsupported file: the caller turns this into a 4xx
            raise ImageLoadError(f"cannot read image {path.name}: {e}") from e
        array = np.asarray(array)
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ImageLoadError(f"{path.name}: expected a 3D volume, got shape {array.shape}")
        vol = cls(array=array, affine=np.asarray(affine, dtype=np.float64), path=str(path))
        vol.modality = (modality or guess_modality(array)).upper()
        return vol

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def plane_spacing(self, axis: int) -> Tuple[float, float]:
        r, c = in_plane_axes(axis)
        sp = self.spacing
        return float(sp[r]), float(sp[c])

    def display_flips(self, axis: int) -> Tuple[bool, bool]:
        """(flip rows, flip cols) that show this volume's slices normal to `axis` as radiologists
        read them, whatever the storage order (preprocess.display_flips)."""
        return display_flips(self.affine, axis)

    def window(self, label: Optional[str] = None) -> Tuple[float, float]:
        if self.modality == "CT":  # a preset per label name
            return intensity_window(self.array, self.modality, label)
        # MR: percentiles of the whole volume, tens of ms: once per volume, not per click
        if self._mr_window is None:
            self._mr_window = intensity_window(self.array, self.modality, label)
        return self._mr_window

    def normalized(self, window: Tuple[float, float]) -> np.ndarray:
        """uint8 volume for `window`, for whole-volume readers (training data, tests); not
        kept: serving reads slices through `normalized_slice`."""
        return normalize_volume(self.array, (float(window[0]), float(window[1])))

    def normalized_slice(self, window: Tuple[float, float], axis: int, index: int) -> np.ndarray:
        """One uint8 slice for `window` (~0.4 ms for 512x512: serving normalises slice by slice,
        so a first click never pays for the whole volume and no normalised copy is kept)."""
        return normalize_volume(take_slice(self.array, axis, index), (float(window[0]), float(window[1])))

    def content_hash(self) -> str:
        """Identity of the voxel data (a changed file with the same id gets new embeddings)."""
        h = hashlib.sha1()
        h.update(str(self.array.shape).encode())
        # the bytes in memory order: an F-ordered array (as NIfTI loads) is hashed through its
        # C-ordered transpose view instead of a 10 MB copy on every first request
        a = self.array if self.array.flags.c_contiguous else (self.array.T if self.array.flags.f_contiguous else np.ascontiguousarray(self.array))
        h.update(a.view(np.uint8).ravel()[:: max(1, a.nbytes // (64 << 20))])
        h.update(self.affine.tobytes())
        return h.hexdigest()[:16]


def _load_nifti(path: Path):
    import nibabel as nib

    if not path.name.endswith(".gz"):
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img.affine
    # ISA-L inflates gzip ~2x faster than zlib (a 512x512x20 CT: 27 ms instead of 55): half of
    # what a first click pays besides the encoder pass was reading the file.
    from isal import igzip

    data = igzip.decompress(path.read_bytes())
    sizeof_hdr = int.from_bytes(data[:4], "little")
    if sizeof_hdr not in (348, 540):
        sizeof_hdr = int.from_bytes(data[:4], "big")
    image_class = nib.Nifti2Image if sizeof_hdr == 540 else nib.Nifti1Image
    img = image_class.from_bytes(data)
    return np.asanyarray(img.dataobj), img.affine


def _load_itk(path: Path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(img)  # (k, j, i)
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise ValueError("multi-component images are not supported")
    array = np.transpose(array, tuple(reversed(range(array.ndim))))
    dim = img.GetDimension()
    direction = np.array(img.GetDirection()).reshape(dim, dim)
    spacing = np.array(img.GetSpacing())
    origin = np.array(img.GetOrigin())
    affine = np.eye(4)
    affine[:dim, :dim] = direction * spacing
    affine[:dim, 3] = origin
    # ITK is LPS, NIfTI affines are RAS.
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine if dim == 3 else affine


class VolumeStore:
    """The last few loaded volumes, keyed by path and mtime, with their content hash."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._items: "OrderedDict[Tuple[str, int], Tuple[Volume, str]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, image_id: str) -> Tuple[Volume, str]:
        """(volume, image key "<id>@<content hash>")."""
        p = Path(path)
        if not p.exists():
            raise NotFound(f"image {image_id!r} not found")
        key = (str(p), p.stat().st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        try:
            vol = Volume.load(p)
        except ImageLoadError as e:
            raise RequestError(str(e), status_code=422) from e
        entry = (vol, f"{image_id}@{vol.content_hash()}")
        with self._lock:
            self._items[key] = entry
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return entry

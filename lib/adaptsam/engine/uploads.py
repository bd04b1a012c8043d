"""Files a client uploads (a mask prompt, a label to save, an image), checked before anything
reads them whole.

A small gzip file can inflate to gigabytes, and a header can declare any size: so the size a
file will take in memory is learnt from its header and a bounded inflate first, and only a file
that fits what the image it belongs to can hold is loaded. A label saved as `final` becomes
training data, so it must also be the image's shape and geometry and hold small non-negative
integers.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import RequestError
from .volume import ImageLoadError, Volume

GZIP_MAGIC = b"\x1f\x8b"
LABEL_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha")
IMAGE_SUFFIXES = LABEL_SUFFIXES
MAX_LABEL_VALUE = 255  # viewers exchange uint8 label maps; segment indices are small
HEADER_ROOM = 1 << 20  # NIfTI extensions, NRRD headers
GEOMETRY_TOLERANCE_MM = 1e-3


class UploadError(RequestError):
    status_code = 422


def suffix_of(name: str, allowed: Sequence[str]) -> str:
    """The file's extension among `allowed` (longest first), or a 422 naming the valid ones."""
    for ext in sorted(allowed, key=len, reverse=True):
        if name.lower().endswith(ext):
            return ext
    raise UploadError(f"file {name!r} is not one of {list(allowed)}")


def check_inflated_size(path: str | Path, limit: int) -> None:
    """413 when a gzip file inflates to more than `limit` bytes; stops inflating there."""
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return
        f.seek(0)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        total = 0
        while not inflater.eof:
            chunk = inflater.unconsumed_tail or f.read(1 << 20)
            if not chunk:
                break
            try:
                total += len(inflater.decompress(chunk, 1 << 22))
            except zlib.error as e:
                raise UploadError(f"file is not valid gzip: {e}") from e
            if total > limit:
                raise UploadError(f"file inflates to more than {limit} bytes", status_code=413)


def header_shape(path: str | Path) -> Tuple[int, ...]:
    """Voxel grid size from the header alone (ITK reads only the header here)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise UploadError(f"not a readable image: {str(e).splitlines()[-1] if str(e) else e}") from e
    size = tuple(int(s) for s in reader.GetSize())
    if reader.GetNumberOfComponents() != 1:
        raise UploadError("multi-component images are not accepted as labels or images")
    while len(size) > 3 and size[-1] == 1:
        size = size[:-1]
    return size


def load_label(path: str | Path, image: Volume) -> np.ndarray:
    """The uploaded label as a uint8 array on `image`'s grid, or a 4xx saying what is wrong."""
    expected = tuple(image.shape)
    check_inflated_size(path, int(np.prod(expected)) * 8 + HEADER_ROOM)  # float64 at most
    shape = header_shape(path)
    if shape != expected:
        raise UploadError(f"label has shape {list(shape)}, the image has {list(expected)}")
    try:
        label = Volume.load(path, modality="MR")
    except ImageLoadError as e:
        raise UploadError(f"label is not a readable image: {e}") from e
    if label.shape != expected:
        raise UploadError(f"label has shape {list(label.shape)}, the image has {list(expected)}")
    off = geometry_mismatch(label.affine, image.affine)
    if off is not None:
        raise UploadError(f"label is not on the image's grid: {off}")
    values = np.asarray(label.array)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise UploadError("label values must be whole numbers (segment indices)")
    lo, hi = (values.min(), values.max()) if values.size else (0, 0)
    if lo < 0 or hi > MAX_LABEL_VALUE:
        raise UploadError(f"label values must lie in 0..{MAX_LABEL_VALUE}, found {lo}..{hi}")
    return values.astype(np.uint8)


def geometry_mismatch(label_affine: np.ndarray, image_affine: np.ndarray) -> Optional[str]:
    """Why two voxel->world maps differ by more than a micrometre, or None."""
    delta = np.abs(np.asarray(label_affine)[:3] - np.asarray(image_affine)[:3])
    if delta[:, :3].max() > GEOMETRY_TOLERANCE_MM:
        return "its spacing or direction differs"
    if delta[:, 3].max() > GEOMETRY_TOLERANCE_MM:
        return f"its origin is {delta[:, 3].max():.3g} mm off"
    return None


def check_image_upload(path: str | Path, limit: int) -> Tuple[int, ...]:
    """An image added to the datastore: readable header, a 2D or 3D grid that fits `limit` bytes."""
    check_inflated_size(path, limit)
    shape = header_shape(path)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise UploadError(f"image must be a 2D or 3D volume, got size {list(shape)}")
    return shape

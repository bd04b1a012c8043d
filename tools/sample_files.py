"""Files for the sample builders (samples.py, sites.py): registry downloads cached and checked
against pinned digests, archive members, NIfTI images written so that every reader agrees, and
writes that never leave a half-written file behind (a build killed halfway is rebuilt, not used)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List

import nibabel as nib
import numpy as np


class SamplesError(RuntimeError):
    """Fetching or building the sample data failed."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_digest(path: Path, expected: str) -> None:
    actual = sha256(path)
    if actual != expected:
        raise SamplesError(f"{path} has SHA-256 {actual}, expected {expected}; delete it and fetch again")


def cached(cache: Path, name: str, expected_sha256: str, download) -> Path:
    """Path of ``cache/name``, downloading it with ``download(tmp_dir) -> file`` if missing."""
    target = cache / name
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        got = download(Path(tmp))
        check_digest(got, expected_sha256)
        os.replace(got, target)
    return target


def run_download(cmd: List[str], tmp: Path, filename: str, what: str, timeout: int) -> Path:
    """Run a registry client that drops `filename` into `tmp`; explain clearly when it fails."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SamplesError(f"could not run {' '.join(cmd)}: {e}") from e
    got = tmp / filename
    if proc.returncode != 0 or not got.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise SamplesError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}. {what} must be reachable "
            f"once; afterwards {filename} is cached in {tmp.parent}. It said:\n{tail}"
        )
    return got



def read_members(archive: Path, wanted) -> Dict[str, bytes]:
    """{member name: bytes} of the regular files of ``archive`` for which ``wanted(name)``."""
    members = {}
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            if info.isfile() and wanted(info.name):
                members[info.name] = tar.extractfile(info).read()
    return members



def nifti(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    img = nib.Nifti1Image(array, affine)
    # Same affine in qform and sform so ITK- and nibabel-based readers agree.
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def load_nifti_bytes(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_nifti(path: Path, img: nib.Nifti1Image) -> None:
    write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=6))


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())

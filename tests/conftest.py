"""Shared fixtures: real sample studies (fetched once by `make test`) and the real base model."""

from __future__ import annotations

import sys
import pytest

from server_util import REPO

sys.path.insert(0, str(REPO / "tools"))  # samples.py builds the sample studies

import samples  # noqa: E402

from adaptsam.model.backbones import build_model  # noqa: E402


@pytest.fixture(scope="session")
def samples_dir():
    root = samples.default_samples_dir()
    samples.fetch(root)
    return root


@pytest.fixture(scope="session")
def base_model():
    """LiteMedSAM without adapters. Tests must not modify it (build their own to attach adapters)."""
    return build_model("litemedsam")


@pytest.fixture(scope="module")
def orthanc(samples_dir, tmp_path_factory):
    """A real PACS for the module's tests: Orthanc on loopback (tools/pacs.py) with the sample CT
    and MR series; (DICOMweb URL, {sample: {"study", "series"}}, folder). Fails with the install
    command when Orthanc is missing."""
    import pacs

    try:
        pacs.orthanc_binary()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    root = tmp_path_factory.mktemp("pacs")
    from server_util import free_port

    port = free_port()
    proc = pacs.start_orthanc(root / "orthanc", port)
    url = f"http://127.0.0.1:{port}/dicom-web"
    try:
        yield url, pacs.upload_samples(url, samples_dir), root
    finally:
        pacs.stop(proc)

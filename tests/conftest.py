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

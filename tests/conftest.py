"""Shared fixtures: real sample studies (fetched once by `make test`) and the real base model."""

from __future__ import annotations

import pytest

from adaptsam import samples
from adaptsam.model.backbones import build_model


@pytest.fixture(scope="session")
def samples_dir():
    root = samples.default_samples_dir()
    samples.fetch(root)
    return root


@pytest.fixture(scope="session")
def base_model():
    """LiteMedSAM without adapters. Tests must not modify it (build their own to attach adapters)."""
    return build_model("litemedsam")

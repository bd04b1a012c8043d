"""Active learning through the server: `/activelearning/uncertainty` with the Slicer client.

The strategy scores unlabelled images by prompt-perturbation disagreement of the served 2D
model, stores the score in the image info with the model that produced it, returns the most
uncertain image, never a labelled one, and reuses scores until the model changes.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import requests
from monailabel.client import MONAILabelClient

import samples
from server_util import WEIGHTS
from adaptsam.server.strategies import INFO_KEY
from server_util import copy_studies, running_server

IMAGES = ("ct_3mm", "mr_3mm")


def _entries(url):
    out = {}
    for image in IMAGES:
        info = requests.get(f"{url}/datastore/image/info", params={"image": image}, timeout=30).json()
        out[image] = info.get(INFO_KEY)
    return out


def test_uncertainty_strategy_picks_the_most_uncertain_unlabelled_image(samples_dir, tmp_path):
    studies = copy_studies(samples_dir, tmp_path / "studies", image_ids=set(IMAGES))
    weights = tmp_path / "weights"
    weights.mkdir()
    shipped = sorted(WEIGHTS.glob("adaptsam_2d_litemedsam_v*.pt"))
    for f in shipped:
        shutil.copy2(f, weights)
    with running_server(studies, conf={"weights_dir": str(weights)}, log=tmp_path / "server.log") as url:
        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))

        first = client.next_sample("uncertainty", {})
        entries = _entries(url)
        assert set(entries) == set(IMAGES) and all(entries.values()), entries
        for e in entries.values():
            assert 0.0 <= e["score"] <= 1.0
            assert e["model"].startswith("litemedsam/2d/")
        best = max(IMAGES, key=lambda i: entries[i]["score"])
        assert first["id"] == best
        assert first["uncertainty"] == entries[best]["score"]

        # a clinician labels it: the next suggestion is the other image, whose score is reused
        label, _, _ = samples.load_reference(samples_dir, best)
        path = tmp_path / f"{best}_label.nii.gz"
        nib.save(nib.Nifti1Image((label > 0).astype(np.uint8), nib.load(str(studies / f"{best}.nii.gz")).affine), str(path))
        client.save_label(best, str(path), tag="final")
        second = client.next_sample("uncertainty", {})
        other = next(i for i in IMAGES if i != best)
        assert second["id"] == other
        assert _entries(url)[other] == entries[other]  # not recomputed: same model, same image

        # MONAI Label's own strategies are offered too and also skip the labelled image
        assert client.next_sample("first", {})["id"] == other
        assert client.next_sample("random", {})["id"] == other

"""The one command that rebuilds the shipped adapters (tools/adapters.py), run at a tiny scale:
its stages chain as documented, its files carry the recipe, and a rerun repeats itself."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import adapters  # noqa: E402
from adaptsam.model import adapter_io  # noqa: E402

TINY = dict(max_epochs=1, steps_per_epoch=1, decoder_epochs=0, train_batch_size=1, corrections=1)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_the_recipe_trains_2d_then_3d_from_identity_on_the_training_studies_only(samples_dir, tmp_path, monkeypatch):
    assert "ct_dicom" not in adapters.TRAINING_STUDIES  # the held-out ct_abdomen set of benchmarks/modalities.py
    # one continuation in each soup instead of three: the same chaining and averaging, fewer runs
    for kind in ("2d", "3d"):
        assert len(adapters.SOUP[kind]["seeds"]) > 1
        monkeypatch.setitem(adapters.SOUP, kind, {**adapters.SOUP[kind], "seeds": adapters.SOUP[kind]["seeds"][:1]})
    lines = []
    files = adapters.build(samples_dir, tmp_path, TINY, log=lines.append)
    # each stage's run is v1; its soup (v1 and one continuation per seed, averaged) is v2
    assert [f.name for f in files] == ["adaptsam_2d_litemedsam_v2.pt", "adaptsam_3d_litemedsam_v2.pt"]
    # the 3D stage starts from the 2D soup's decoder adapters, not from the 2D stage's first run
    assert any("3d decoder adapter initialised from adaptsam_2d_litemedsam_v2.pt" in line for line in lines)
    for kind, path in zip(("2d", "3d"), files):
        soup = adapter_io.read_adapter_meta(path)
        seeds = adapters.SOUP[kind]["seeds"]
        inputs = soup["averaged_from"]
        assert [a["file"] for a in inputs] == [f"adaptsam_{kind}_litemedsam_v1.pt"] + [f"adaptsam_{kind}_litemedsam_v2.pt"] * len(seeds)
        expected = adapters.stage_options(kind, TINY).to_dict()
        assert {k: inputs[0]["options"][k] for k in expected} == expected
        assert inputs[0]["options"]["resume"] is False and inputs[0]["previous_version"] == 0  # from identity
        for a, seed in zip(inputs[1:], seeds):  # each continues from v1 with its own seed
            assert a["options"]["seed"] == seed and a["options"]["resume"] is True and a["previous_version"] == 1
        assert len({a["sha256"] for a in inputs}) == len(inputs)
        assert sorted(soup["training_images"]) == ["ct_3mm.nii.gz", "mr_3mm.nii.gz"]
    assert adapter_io.read_adapter_meta(files[1])["config"]["decoder_blocks"] == 2

    # a rerun (its 2D stage) gives the same tensors: fixed seeds and step counts, no time budget
    again = adapters.build(samples_dir, tmp_path / "again", TINY, stages=("2d",), log=lambda s: None)[0]
    first, second = _state(files[0])["state_dict"], _state(again)["state_dict"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(first[k].abs().sum() > 0 for k in first if "decoder" in k)  # it did train

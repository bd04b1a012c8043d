"""The adapter trainer in-process: only adapters move, simulated clicks, atomic publish."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import samples
from adaptsam.engine.models import ModelHandle, published_versions
from adaptsam.model import adapter_io
from adaptsam.model.adapters import AdapterConfig, attach_adapters, base_state_dict, is_adapter_name
from adaptsam.model.backbones import build_model
from adaptsam.training import starting_point
from adaptsam.training.data import load_pair, split_by_image
from adaptsam.training.distributed import train_distributed
from adaptsam.training.loop import AdapterTrainer
from adaptsam.training.options import TrainOptions, add_arguments, from_args
from adaptsam.training.simulation import carve
from server_util import WEIGHTS
from server_util import shipped as shipped_adapter


def test_short_run_publishes_adapters_and_keeps_base_bit_identical(samples_dir, tmp_path, base_model):
    # with the clicks carved into the carried logits of the correction rounds, as the server does;
    # published unmeasured (the gate has its own tests: test_gate.py, test_server_training.py)
    # seed 0 trains on the MR (the decoder epoch embeds every training slice: 20, one window)
    opts = TrainOptions(kind="2d", max_epochs=2, steps_per_epoch=2, train_batch_size=2, val_split=0.5, val_pairs=6, seed=0,
                        carve_clicks=True, publish="always")
    stats = tmp_path / "stats.json"
    trainer = AdapterTrainer(samples.training_datalist(samples_dir, ["mr_3mm", "ct_3mm"]), opts, tmp_path, stats_path=stats, log=print)
    trainer_result = trainer.run()
    model = trainer.model
    # every base tensor (parameters and BatchNorm statistics) is bit-identical to the checkpoint's
    fresh = base_state_dict(base_model)
    for k, v in base_state_dict(model).items():
        assert torch.equal(v.cpu(), fresh[k]), k
    s = json.loads(stats.read_text())
    for key in ("epoch", "total_epochs", "total_time", "best_metric", "train_dice", "val_dice"):
        assert key in s
    assert s["epoch"] == 2 and s["total_epochs"] == 2 and set(s["val_dice"]) >= {"box", "click1", "click3"}
    assert "click+1" in s["train_dice"] or "box+1" in s["train_dice"]  # correction rounds ran
    versions = published_versions(tmp_path, "2d", "litemedsam")
    assert trainer_result.published == str(versions[0][1]) and [v for v, _ in versions] == [1]
    meta = adapter_io.read_adapter_meta(versions[0][1])
    assert meta["version"] == 1 and meta["training_images"] and meta["validation_images"] and "best_val_dice" in meta["metrics"]
    assert meta["images_seen"] == sorted(meta["training_images"])  # started from identity: nothing learnt before
    assert meta["started_from"] == {}
    assert meta["options"]["carve_clicks"] is True and meta["options"]["carry_logits"] is True
    assert adapter_io.serving_mode(meta)["box_decoder"] == "base"  # unmeasured: boxes by the base decoder
    payload = adapter_io.read_adapter_file(versions[0][1])
    assert all(is_adapter_name(k) for k in payload["state_dict"])
    served = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d"))
    adapter_io.load_adapters(versions[0][1], served)
    assert not list(tmp_path.glob("*.tmp"))
    # the training-side carving lands where the click is: a positive click at the middle of the
    # model input on all-background logits paints the middle of the low-res grid, nothing far off
    low = trainer.low_res
    logits = torch.full((2, 1, low, low), -5.0)
    carved = carve(logits, [[(128.0, 128.0, 1)], [(8.0, 8.0, 0)]], trainer.model.input_size)
    assert carved[0, 0, low // 2, low // 2] > 0 and carved[0, 0, 0, 0] == -5.0 and carved[0, 0, -1, -1] == -5.0
    assert carved[1, 0, 1, 1] < -5.0 and carved[1, 0, low // 2, low // 2] == -5.0
    assert torch.all(logits == -5.0)


def test_trainer_moves_adapters_in_a_single_step(samples_dir, tmp_path):
    # one saved label leaves the gate nothing to measure with: publish=always (the CLI's way to
    # build shipped adapters) publishes the run's best epoch unmeasured
    opts = TrainOptions(kind="3d", max_epochs=1, steps_per_epoch=1, train_batch_size=1, val_split=0, seed=2, publish="always")
    trainer = AdapterTrainer(samples.training_datalist(samples_dir, ["mr_3mm"]), opts, tmp_path, log=print)
    result = trainer.run()
    assert result.published and result.version == 1
    payload = adapter_io.read_adapter_file(result.published)
    moved = [k for k, v in payload["state_dict"].items() if v.abs().sum() > 0 and ".up." in k]
    assert moved, "no up-projection left zero init"
    assert payload["meta"]["kind"] == "3d"
    # corrections get the previous logits, as trained: published runs and the shipped files say so
    assert ModelHandle("3d", "litemedsam", tmp_path, "cpu").current().carries_logits is True
    assert ModelHandle("2d", "litemedsam", WEIGHTS, "cpu").current().carries_logits is True
    assert ModelHandle("2d", "litemedsam", tmp_path / "empty", "cpu").current().carries_logits is True
    # a box alone teaches the decoder adapters too, even with no correction round after it (the
    # publish gate may serve a version's boxes through its own decoder); the base decoder's answer
    # is scored beside it
    trainer.opt = dataclasses.replace(trainer.opt, corrections=0)
    gts = torch.zeros(1, trainer.low_res, trainer.low_res, dtype=torch.bool)
    gts[0, 80:160, 90:150] = True
    emb = torch.randn(1, 256, *trainer.model.prompt_encoder.image_embedding_size)  # fixed, as in the decoder phase
    loss, dices = trainer.decode_rounds(emb, gts, True, [None])
    assert loss.requires_grad and set(dices) == {"box", "box_own"}


def test_distributed_path_runs_two_ranks_on_cpu(samples_dir, tmp_path):
    """MONAI Label's multi-GPU path, exercised with the gloo backend on CPU: two ranks average
    adapter gradients every step and rank 0 publishes once."""
    opts = TrainOptions(kind="2d", max_epochs=1, steps_per_epoch=1, train_batch_size=1, val_split=0, decoder_epochs=0, seed=3,
                        publish="always")
    train_distributed(2, backend="gloo", datalist=samples.training_datalist(samples_dir, ["mr_3mm"]), options=opts,
                      weights_dir=tmp_path, backbone="litemedsam", stats_path=tmp_path / "stats.json")
    versions = published_versions(tmp_path, "2d", "litemedsam")
    assert [v for v, _ in versions] == [1]
    assert json.loads((tmp_path / "stats.json").read_text())["state"] == "DONE"


def test_a_retrain_keeps_the_layout_it_resumes_from(samples_dir, tmp_path):
    """An adapter with decoder adapters in both two-way blocks (the shipped 3D layout): a retrain
    with default options (what the server's POST /train does) must resume from it, not start
    from zero in the default layout."""
    data = samples.training_datalist(samples_dir, ["mr_3mm"])
    quick = dict(kind="2d", max_epochs=1, steps_per_epoch=1, train_batch_size=1, val_split=0, decoder_epochs=0, publish="always")
    first = AdapterTrainer(data, TrainOptions(**quick, decoder_blocks=2, seed=4), tmp_path, log=print).run()
    assert adapter_io.read_adapter_meta(first.published)["config"]["decoder_blocks"] == 2
    logs = []
    second = AdapterTrainer(data, TrainOptions(**quick, seed=5), tmp_path, log=logs.append).run()
    meta = adapter_io.read_adapter_meta(second.published)
    assert any(line.startswith("resuming from adaptsam_2d_litemedsam_v1.pt") for line in logs), logs
    assert meta["version"] == 2 and meta["previous_version"] == 1
    assert meta["config"]["decoder_blocks"] == 2


def test_min_area_fraction_drops_only_the_small_cross_sections(samples_dir):
    # an organ's end slices (partial-volume slivers) can be left out of training; the rest stays
    args = (str(samples.image_path(samples_dir, "ct_3mm")), str(samples.reference_path(samples_dir, "ct_3mm")), 256, 256, 24, "default")
    every = load_pair(*args)
    cores = load_pair(*args, min_area_fraction=0.3)

    def areas(vs):
        return {(k, v): int(m.sum()) for k, s in vs.slices.items() for v, m in s.low_res.items()}

    all_areas, kept = areas(every), areas(cores)
    largest = {}
    for (_, v), a in all_areas.items():
        largest[v] = max(largest.get(v, 0), a)
    assert set(kept) < set(all_areas)
    assert {v for _, v in kept} == {v for _, v in all_areas}  # every object keeps its largest slice
    for key, a in all_areas.items():
        assert (key in kept) == (a >= 0.3 * largest[key[1]]), key
    # a request option (POST /train/adaptsam, --conf train_min_area_fraction) like the others
    assert TrainOptions.from_request({"min_area_fraction": "0.3"}, "2d").min_area_fraction == 0.3


def test_the_command_line_has_a_flag_per_option_and_requests_are_checked():
    ap = argparse.ArgumentParser()
    add_arguments(ap, max_epochs=7)
    args = ap.parse_args(["--kind", "3d", "--learning-rate", "2e-3", "--no-resume", "--carve-clicks"])
    opts = from_args(args)
    assert (opts.kind, opts.learning_rate, opts.resume, opts.carve_clicks, opts.max_epochs) == ("3d", 2e-3, False, True, 7)
    assert set(vars(args)) == set(TrainOptions.option_names())
    assert TrainOptions.from_request({"max_epochs": "3", "resume": "false", "model": "adaptsam"}, "2d").max_epochs == 3
    with pytest.raises(ValueError, match="max_epochs"):
        TrainOptions.from_request({"max_epochs": "many"}, "2d")


def test_the_time_budget_keeps_room_for_the_epoch_validation_that_follows_the_last_step(tmp_path):
    """A run stops stepping early enough that the epoch's validation (which follows its last step)
    still ends within `max_minutes`, not only the gate's measurement."""
    trainer = AdapterTrainer([], TrainOptions(kind="2d", max_minutes=1.0), tmp_path)
    started = time.time() - 45  # 15 s of the minute left
    assert not trainer.over_budget(started)
    trainer.validation_seconds = 20.0  # as long as the last validation took
    assert trainer.over_budget(started)
    assert not AdapterTrainer([], TrainOptions(kind="2d", max_minutes=0.0), tmp_path).over_budget(started - 3600)  # 0: none


def test_validation_is_held_out_from_images_the_starting_version_never_learnt_from(tmp_path):
    """The gate compares a run's result with the version it started from, on the run's
    validation images: on an image that version trained on, it would be measured on its own
    training data. So validation images come from the rest while there are any."""
    shipped = shipped_adapter()[1]
    shutil.copy2(shipped, tmp_path)
    learnt = adapter_io.images_seen(adapter_io.read_adapter_meta(shipped))
    assert learnt  # the shipped file names the images it trained on
    # resuming, and a fresh 3d adapter, which takes the 2d adapter's decoder and what it learnt from
    for kind in ("2d", "3d"):
        start = starting_point.prepare(TrainOptions(kind=kind), tmp_path, "litemedsam", torch.device("cpu"), print)
        assert start.images_seen == learnt, kind
        # the file it started from, named and checksummed for its result's metadata
        assert start.started_from == {"file": shipped.name, "sha256": hashlib.sha256(shipped.read_bytes()).hexdigest(),
                                      "version": shipped_adapter()[0], "part": "all" if kind == "2d" else "decoder"}, kind
    items = [{"image": f"/datastore/{name}", "label": f"/datastore/labels/{name}"} for name in sorted(learnt) + ["site_1.nii.gz"]]
    for seed in range(6):
        train, val = split_by_image(items, 0.5, seed, learnt)  # the share asks for 2: only 1 is honest
        assert [Path(d["image"]).name for d in val] == ["site_1.nii.gz"]
        assert sorted(d["image"] for d in train + val) == sorted(d["image"] for d in items)
        # with nothing learnt before, the share is held out at random
        train, val = split_by_image(items, 0.5, seed)
        assert len(val) == 2 and len(train) == 1
    # every saved image was learnt from: still one held out (the run logs that the gate favours the start there)
    train, val = split_by_image(items[:-1], 0.5, 0, learnt)
    assert len(val) == 1 and len(train) == len(items) - 2

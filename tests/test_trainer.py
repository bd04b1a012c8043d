"""The adapter trainer in-process: only adapters move, simulated clicks, atomic publish."""

from __future__ import annotations

import json

import torch

from adaptsam import samples
from adaptsam.engine.models import ModelHandle, published_versions
from adaptsam.model import adapter_io
from adaptsam.model.adapters import AdapterConfig, adapter_state_dict, attach_adapters, base_state_dict, is_adapter_name
from adaptsam.model.backbones import build_model, default_weights_dir
from adaptsam.trainers.data import load_pair
from adaptsam.trainers.loop import AdapterTrainer, TrainOptions


def _datalist(samples_dir, ids):
    return [{"image": str(samples.image_path(samples_dir, i)), "label": str(samples.reference_path(samples_dir, i))} for i in ids]


def test_short_run_publishes_adapters_and_keeps_base_bit_identical(samples_dir, tmp_path, base_model):
    # with the guide box in the correction rounds after a first click and the clicks carved into
    # the carried logits, as the server does
    opts = TrainOptions(kind="2d", max_epochs=2, steps_per_epoch=2, train_batch_size=2, val_split=0.5, val_pairs=6, seed=1,
                        guide_corrections=True, carve_clicks=True)
    stats = tmp_path / "stats.json"
    trainer = AdapterTrainer(_datalist(samples_dir, ["mr_3mm", "ct_3mm"]), opts, tmp_path, stats_path=stats, log=print)
    # force a publication even if 2 tiny epochs do not beat the zero adapter on validation
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
    assert "click+1" in s["train_dice"]  # a click-started batch ran its guided correction rounds
    if trainer_result.published:
        versions = published_versions(tmp_path, "2d", "litemedsam")
        assert [v for v, _ in versions] == [1]
        meta = adapter_io.read_adapter_meta(versions[0][1])
        assert meta["version"] == 1 and meta["training_images"] and "best_val_dice" in meta["metrics"]
        assert meta["options"]["guide_corrections"] is True and meta["options"]["carve_clicks"] is True
        payload = adapter_io.read_adapter_file(versions[0][1])
        assert all(is_adapter_name(k) for k in payload["state_dict"])
        served = attach_adapters(build_model("litemedsam"), AdapterConfig(kind="2d"))
        adapter_io.load_adapters(versions[0][1], served)
    assert not list(tmp_path.glob("*.tmp"))
    # the training-side carving lands where the click is: a positive click at the middle of the
    # model input on all-background logits paints the middle of the low-res grid, nothing far off
    low = trainer.low_res
    logits = torch.full((2, 1, low, low), -5.0)
    carved = trainer._carved(logits, [[(128.0, 128.0, 1)], [(8.0, 8.0, 0)]])
    assert carved[0, 0, low // 2, low // 2] > 0 and carved[0, 0, 0, 0] == -5.0 and carved[0, 0, -1, -1] == -5.0
    assert carved[1, 0, 1, 1] < -5.0 and carved[1, 0, low // 2, low // 2] == -5.0
    assert torch.all(logits == -5.0)


def test_trainer_moves_adapters_in_a_single_step(samples_dir, tmp_path):
    # trained without carried logits (SAM's mask prompt in correction rounds): served the same way
    opts = TrainOptions(kind="3d", max_epochs=1, steps_per_epoch=1, train_batch_size=1, val_split=0, seed=2, carry_logits=False)
    trainer = AdapterTrainer(_datalist(samples_dir, ["mr_3mm"]), opts, tmp_path, log=print)
    result = trainer.run()  # no validation: the last epoch is published
    assert result.published and result.version == 1
    payload = adapter_io.read_adapter_file(result.published)
    moved = [k for k, v in payload["state_dict"].items() if v.abs().sum() > 0 and ".up." in k]
    assert moved, "no up-projection left zero init"
    assert payload["meta"]["kind"] == "3d"
    assert payload["meta"]["options"]["carry_logits"] is False
    assert ModelHandle("3d", "litemedsam", tmp_path, "cpu").current().carries_logits is False
    # the shipped adapters predate the option and were trained with it; the base model gets it too
    assert ModelHandle("2d", "litemedsam", default_weights_dir(), "cpu").current().carries_logits is True
    assert ModelHandle("2d", "litemedsam", tmp_path / "empty", "cpu").current().carries_logits is True


def test_distributed_path_runs_two_ranks_on_cpu(samples_dir, tmp_path):
    """MONAI Label's multi-GPU path, exercised with the gloo backend on CPU: two ranks average
    adapter gradients every step and rank 0 publishes once."""
    from adaptsam.trainers.loop import train_distributed

    opts = TrainOptions(kind="2d", max_epochs=1, steps_per_epoch=1, train_batch_size=1, val_split=0, decoder_epochs=0, seed=3)
    train_distributed(2, backend="gloo", datalist=_datalist(samples_dir, ["mr_3mm"]), options=opts,
                      weights_dir=tmp_path, backbone="litemedsam", stats_path=tmp_path / "stats.json")
    versions = published_versions(tmp_path, "2d", "litemedsam")
    assert [v for v, _ in versions] == [1]
    assert json.loads((tmp_path / "stats.json").read_text())["state"] == "DONE"


def test_a_retrain_keeps_the_layout_it_resumes_from(samples_dir, tmp_path):
    """An adapter with decoder adapters in both two-way blocks and LoRA on the decoder
    attentions: a retrain with default options (what the server's POST /train does) must
    resume from it, not start from zero in the default layout."""
    data = _datalist(samples_dir, ["mr_3mm"])
    quick = dict(kind="2d", max_epochs=1, steps_per_epoch=1, train_batch_size=1, val_split=0, decoder_epochs=0)
    first = AdapterTrainer(data, TrainOptions(**quick, decoder_blocks=2, decoder_lora_rank=4, seed=4), tmp_path, log=print).run()
    assert adapter_io.read_adapter_meta(first.published)["config"]["decoder_blocks"] == 2
    logs = []
    second = AdapterTrainer(data, TrainOptions(**quick, seed=5), tmp_path, log=logs.append).run()
    meta = adapter_io.read_adapter_meta(second.published)
    assert any(line.startswith("resuming from adaptsam_2d_litemedsam_v1.pt") for line in logs), logs
    assert meta["version"] == 2 and meta["previous_version"] == 1
    assert meta["config"]["decoder_blocks"] == 2 and meta["config"]["decoder_lora_rank"] == 4
    # The box-consistency term holds box answers to the model the run starts from: its teacher
    # is that adapter, frozen, while the student moves on.
    third = AdapterTrainer(data, TrainOptions(**quick, seed=6, box_consistency=2.0), tmp_path, log=print)
    result = third.run()
    resumed = adapter_io.read_adapter_file(second.published)["state_dict"]
    published = adapter_io.read_adapter_file(result.published)
    teacher = adapter_state_dict(third.teacher)
    assert set(teacher) == set(resumed)
    assert all(torch.equal(teacher[k], resumed[k]) for k in resumed)
    assert not all(torch.equal(published["state_dict"][k], resumed[k]) for k in resumed)
    assert not any(p.requires_grad for p in third.teacher.parameters())
    assert published["meta"]["options"]["box_consistency"] == 2.0


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


def test_training_renderings_are_upright_and_field_mm_adds_a_wider_field(samples_dir, tmp_path):
    """ct_3mm is stored RAS: its training slices are shown turned to display orientation, as
    served. field_mm adds each volume again as a 500 mm field of view shows it (the 366 mm CT
    smaller in the model input); validation images keep only their own rendering."""
    image, label = str(samples.image_path(samples_dir, "ct_3mm")), str(samples.reference_path(samples_dir, "ct_3mm"))
    own = load_pair(image, label, 256, 256, 24, "default")
    wide = load_pair(image, label, 256, 256, 24, "default", min_field=500.0)
    k = max(own.slices, key=lambda s: len(own.slices[s].objects))
    g_own, g_wide = own.slices[k].geom, wide.slices[k].geom
    assert (g_own.flip_rows, g_own.flip_cols) == (True, True) and own.field_mm == 122 * 3.0
    assert g_wide.new_cols == round(366 / 500 * 256) and g_own.new_cols == 256  # columns run along i (122 voxels)
    # the same object, about (366/500)^2 of its area in the wide rendering
    v = next(iter(set(own.slices[k].objects) & set(wide.slices[k].objects)))
    ratio = int(wide.slices[k].low_res[v].sum()) / int(own.slices[k].low_res[v].sum())
    assert abs(ratio - (366 / 500) ** 2) < 0.1
    # upright: the spine (vertebrae) lies in the lower half of the picture, as in the held-out CT
    _, _, names = samples.load_reference(samples_dir, "ct_3mm")
    spine = [val for val, n in names.items() if n.startswith("vertebrae")]
    rows = [r for s in own.slices.values() for val, m in s.low_res.items() if val in spine for r in torch.nonzero(m)[:, 0].tolist()]
    assert rows and sum(rows) / len(rows) > 128

    trainer = AdapterTrainer(_datalist(samples_dir, ["mr_3mm"]), TrainOptions(kind="2d", field_mm=500.0), tmp_path)
    trainer.model = build_model("litemedsam")
    trainer.low_res = 256
    items = _datalist(samples_dir, ["mr_3mm"])
    assert [vs.slices[0].geom.new_cols for vs in trainer._load_data(items, wide_field=True)] == [256, round(117 * 3 / 500 * 256)]
    assert len(trainer._load_data(items)) == 1
    assert TrainOptions.from_request({"field_mm": "500"}, "2d").field_mm == 500.0


def test_inner_clicks_fall_inside_error_regions_drawn_by_area(tmp_path):
    """inner_clicks: a random correction click picks an error region's part by its area, then
    a pixel at least half as deep as its deepest one, never the rim of a wide region."""
    trainer = AdapterTrainer([], TrainOptions(inner_clicks=True, seed=7), tmp_path)
    region = torch.zeros(64, 64, dtype=torch.bool)
    region[10:30, 10:30] = True  # 400 px, deepest 10 px from its rim
    region[50, 0:60] = True  # a one-pixel band along a boundary, 60 px
    clicks = [tuple(trainer._sample_inner_point(region)[0]) for _ in range(400)]
    in_band = [rc for rc in clicks if rc[0] == 50]
    in_square = [rc for rc in clicks if rc[0] != 50]
    assert all(14 <= r <= 25 and 14 <= c <= 25 for r, c in in_square)  # depth >= 5 of 10, not the rim
    assert 0.06 < len(in_band) / len(clicks) < 0.22  # 60 / 460 of the error drawn by area
    assert len(trainer._sample_inner_point(torch.zeros(8, 8, dtype=torch.bool))) == 0
    assert TrainOptions.from_request({"inner_clicks": "true"}, "2d").inner_clicks is True

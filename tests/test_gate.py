"""The publish gate and the built-in evaluation, in process on real volumes and the real model:
a candidate that is better than what is served is published, one made worse on purpose is kept
back with its reason and can still be pinned; the evaluation report has what a person reads."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import samples
from adaptsam.engine.models import ModelHandle, published_versions
from adaptsam.evaluation import report as report_io
from adaptsam.evaluation.protocol import Protocol, summarise
from adaptsam.evaluation.runner import Case, ModelSpec, base_spec, evaluate_models
from adaptsam.model import adapter_io
from adaptsam.training import gate
from server_util import WEIGHTS, shipped

QUICK = Protocol(corrections=2, max_clicks=3, report_clicks=(1, 3))


def _saved_label(samples_dir, out_dir, structures):
    """mr_3mm with some of its silver structures as the saved label (values 1..n, named)."""
    label, affine, _ = samples.load_reference(samples_dir, "mr_3mm")
    out = np.zeros(label.shape, np.uint8)
    for i, name in enumerate(structures, 1):
        out[label == samples.label_value(samples_dir, "mr_3mm", name)] = i
    path = out_dir / f"mr_3mm_{'_'.join(structures)}.nii.gz"
    nib.save(nib.Nifti1Image(out, affine), str(path))
    return {"image": str(samples.image_path(samples_dir, "mr_3mm")), "label": str(path),
            "names": {i: n for i, n in enumerate(structures, 1)}}


@pytest.fixture(scope="module")
def case(samples_dir, tmp_path_factory):
    return _saved_label(samples_dir, tmp_path_factory.mktemp("gate"), ("liver", "spleen", "kidney_right"))


@pytest.fixture(scope="module")
def spleen(samples_dir, tmp_path_factory):
    """One structure is enough for the gate's decisions; each measurement encodes its 12 slices."""
    return _saved_label(samples_dir, tmp_path_factory.mktemp("gate"), ("spleen",))


def test_judge_rules():
    base = {"box": 0.70, "score": 0.50}
    served = {"box": 0.75, "score": 0.60}
    assert gate.judge({"box": 0.80, "score": 0.61}, served, base).publish
    assert not gate.judge({"box": 0.80, "score": 0.60}, served, base).publish  # not better than served
    worse_box = gate.judge({"box": 0.685, "score": 0.90}, served, base)
    assert not worse_box.publish and "box Dice" in worse_box.reason
    assert gate.judge({"box": 0.695, "score": 0.51}, None, base).publish  # nothing served: beat the base model


def test_the_gate_keeps_the_better_way_of_answering_boxes():
    base = {"box": 0.70, "score": 0.50}
    served = {"box": 0.75, "score": 0.60}
    own_better = gate.judge_both_ways({"base": {"box": 0.76, "score": 0.62}, "adapted": {"box": 0.80, "score": 0.65}}, served, base)
    assert own_better.publish and own_better.box_decoder == "adapted" and own_better.scores["candidate"]["box"] == 0.80
    assert own_better.by_box_decoder["base"] == {"box": 0.76, "score": 0.62} and "adapted decoder" in own_better.reason
    # a higher score is no use when its boxes fall below the base model's: the publishable way wins
    own_forgets = gate.judge_both_ways({"base": {"box": 0.76, "score": 0.62}, "adapted": {"box": 0.65, "score": 0.70}}, served, base)
    assert own_forgets.publish and own_forgets.box_decoder == "base"
    tie = gate.judge_both_ways({"base": {"box": 0.76, "score": 0.62}, "adapted": {"box": 0.76, "score": 0.62}}, served, base)
    assert tie.box_decoder == "base"
    neither = gate.judge_both_ways({"base": {"box": 0.76, "score": 0.55}, "adapted": {"box": 0.77, "score": 0.58}}, served, base)
    assert not neither.publish and neither.box_decoder == "adapted"  # kept back, with its better way recorded


def test_on_one_validation_image_boxes_stay_on_the_base_decoder():
    """One image cannot show that the adapted decoder's boxes hold on the site's others: the
    candidate is judged, and served, with boxes through the base decoder; both ways recorded."""
    base = {"box": 0.70, "score": 0.50}
    served = {"box": 0.75, "score": 0.60}
    both = {"base": {"box": 0.76, "score": 0.62}, "adapted": {"box": 0.90, "score": 0.70}}
    one = gate.judge_both_ways(both, served, base, images=1)
    assert one.publish and one.box_decoder == "base" and one.scores["candidate"]["score"] == 0.62
    assert one.by_box_decoder["adapted"] == {"box": 0.90, "score": 0.70} and "validation images" in one.reason
    assert gate.judge_both_ways(both, served, base, images=2).box_decoder == "adapted"
    # publishable only through its own decoder: on one image, kept back
    only_own = gate.judge_both_ways({"base": {"box": 0.76, "score": 0.58}, "adapted": {"box": 0.90, "score": 0.70}}, served, base, images=1)
    assert not only_own.publish and only_own.box_decoder == "base"


def test_better_candidate_published_worse_one_kept_and_pinnable(spleen, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    # nothing published yet: the reference is the base model; the shipped 2D adapter, which was
    # trained on this volume, is the "better" candidate
    g = gate.Gate(weights, "2d", "litemedsam", [spleen], log=print, protocol=QUICK)
    g.measure_references()
    assert set(g.references) == {"base"}
    better = gate.candidate_path(weights, "2d", "litemedsam")
    better.parent.mkdir()
    shutil.copy2(shipped()[1], better)
    decision = g.decide(better)
    print(decision.reason, decision.by_box_decoder)
    assert decision.publish and decision.scores["candidate"]["score"] > decision.scores["base"]["score"]
    # measured both ways of answering a box alone (they differ); on its one validation image the
    # base decoder's way is the one judged and kept, in the file
    ways = decision.by_box_decoder
    assert set(ways) == {"base", "adapted"} and ways["adapted"]["box"] != ways["base"]["box"]
    assert decision.box_decoder == "base"
    assert decision.scores["candidate"]["score"] == ways["base"]["score"]
    gate.record_box_decoder(better, decision.box_decoder)
    published = gate.publish_candidate(better, weights, decision.reason)
    assert published.name == "adaptsam_2d_litemedsam_v1.pt"
    meta = adapter_io.read_adapter_meta(published)
    assert meta["published_because"] == decision.reason and meta["box_decoder"] == decision.box_decoder
    served = ModelHandle("2d", "litemedsam", weights, "cpu").current()
    assert served.boxes_on_base_decoder == (decision.box_decoder == "base")

    # a candidate made worse on purpose: the served adapter's tensors zeroed, i.e. a run that
    # learnt nothing (the base model), which the served version beats at clicks by far (noise on
    # the tensors changed this structure's score by less than 0.001)
    payload = adapter_io.read_adapter_file(published)
    payload["state_dict"] = {k: torch.zeros_like(v) for k, v in payload["state_dict"].items()}
    worse = gate.candidate_path(weights, "2d", "litemedsam")
    assert worse.name.endswith("_c2.pt")
    torch.save(payload, worse)
    g = gate.Gate(weights, "2d", "litemedsam", [spleen], log=print, protocol=QUICK)
    g.measure_references()
    assert set(g.references) == {"base", "served"}
    decision = g.decide(worse)
    print(decision.reason)
    assert not decision.publish and "does not beat the served version's" in decision.reason
    gate.write_report(worse, decision)
    listed = gate.list_candidates(weights, "2d", "litemedsam")
    assert [c["candidate"] for c in listed] == ["c1", "c2"] and listed[1]["publish"] is False and listed[1]["reason"]
    assert [v for v, _ in published_versions(weights, "2d", "litemedsam")] == [1]  # nothing new served
    handle = ModelHandle("2d", "litemedsam", weights, "cpu")
    assert handle.current().version == 1
    handle.pin("c2")  # a kept candidate can still be looked at
    assert handle.current().source.endswith("_c2.pt")


def test_without_a_validation_image_nothing_is_published(tmp_path):
    g = gate.Gate(tmp_path, "2d", "litemedsam", [], log=print)
    assert not g.can_measure
    decision = g.decide(tmp_path / "x.pt")
    assert not decision.publish and "single saved label" in decision.reason


def test_evaluation_report_has_the_protocol_metrics_and_plots(case, tmp_path):
    cases = [Case("mr_3mm", case["image"], case["label"], case["names"])]
    models = {"base": base_spec(), "2d": ModelSpec("2d", str(WEIGHTS))}
    report = evaluate_models(models, cases, QUICK, log=print, only=["liver", "spleen"])
    rows = report["models"]["2d"]["structures"]
    assert [r["structure"] for r in rows] == ["liver", "spleen"]
    for r in rows:
        assert len(r["box_steps"]) == 1 + QUICK.corrections and len(r["click_steps"]) <= QUICK.max_clicks
        assert 0 <= r["box_final_nsd"] <= 1 and r["box_auc"] <= max(r["box_steps"]) + 1e-9
    s = summarise(rows, QUICK)
    assert s["structures"] == 2 and s["score"] == round((s["box_auc"] + s["click_auc"]) / 2, 4)
    # the adapter that trained on this volume answers its clicks far better than the base model
    assert report["models"]["2d"]["summary"]["click1"] > report["models"]["base"]["summary"]["click1"] + 0.3
    paths = report_io.write(report, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["models"]["2d"]["summary"] == report["models"]["2d"]["summary"]
    assert paths["dice_per_interaction"].stat().st_size > 10_000 and paths["final_dice_per_structure"].stat().st_size > 10_000
    assert "| 2d |" in paths["table"].read_text()

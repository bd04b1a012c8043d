"""The publish gate: a training run's result is a candidate; it is served only when the
interactive protocol (evaluation/) measures it better for this site than what is served, and
not worse than the base model at boxes.

The measurement uses the run's validation images: the site's own saved labels, split by image,
that the candidate never trained on. The candidate is measured twice, a box alone answered by
the base model's decoder (as every version is served by default) and by its own: the better
way is written into its file and served with it, but its own decoder only once it is measured
on MIN_IMAGES_FOR_ADAPTED_BOXES validation images. Trained on one image and measured on one
other, a site's adapted decoder has answered boxes far better than the base decoder there and
far worse than the base model on the site's next images (docs/experiments.md); the base decoder
does not train, so through it a box is answered from the adapted image embedding as the shipped
adapters are served. With a single saved label there is nothing honest to measure on, and the
candidate is kept, not published. A kept candidate lives in
`<weights>/candidates/` with its report: it can be pinned for a look (`version=cN`) or
published by hand (`POST /adaptsam/candidates/<model>/publish`), which is logged.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..engine.interactive import Runtime
from ..engine.models import CANDIDATES, published_name, published_versions
from ..evaluation.protocol import Protocol
from ..evaluation.runner import Case, ModelSpec, base_spec, evaluate_models
from ..model import adapter_io

BOX_MARGIN = 0.01  # a candidate may answer boxes at most this much worse than the base model
MIN_LABELS = 2  # saved labels before a candidate can be measured on one it did not train on
MIN_IMAGES_FOR_ADAPTED_BOXES = 2  # validation images before boxes may go to the candidate's own decoder
# the score needs the box session and clicks 1..5; longer click sessions only count clicks-to-Dice
GATE_PROTOCOL = Protocol(max_clicks=5)


@dataclass
class GateDecision:
    publish: bool
    reason: str
    scores: Dict[str, Dict] = field(default_factory=dict)  # model name -> evaluation summary
    seconds: float = 0.0
    box_decoder: str = "base"  # which decoder answers the candidate's boxes (adapter_io.serving_mode)
    by_box_decoder: Dict[str, Dict] = field(default_factory=dict)  # box Dice and score, each way

    def to_dict(self) -> Dict:
        return asdict(self)


def judge(candidate: Dict, served: Optional[Dict], base: Dict, margin: float = BOX_MARGIN) -> GateDecision:
    """Publish when the candidate's box Dice is within `margin` of the base model's and its
    protocol score beats the served version's (the base model's when nothing is published)."""
    scores = {"candidate": candidate, "base": base, **({"served": served} if served is not None else {})}
    if candidate["box"] < base["box"] - margin:
        return GateDecision(False, f"box Dice {candidate['box']:.3f} is below the base model's {base['box']:.3f} "
                                   f"by more than {margin}", scores)
    reference, who = (served, "served version") if served is not None else (base, "base model")
    if candidate["score"] <= reference["score"]:
        return GateDecision(False, f"protocol score {candidate['score']:.3f} does not beat the {who}'s "
                                   f"{reference['score']:.3f}", scores)
    return GateDecision(True, f"protocol score {candidate['score']:.3f} beats the {who}'s {reference['score']:.3f}; "
                              f"box Dice {candidate['box']:.3f} (base {base['box']:.3f})", scores)


def judge_both_ways(by_decoder: Dict[str, Dict], served: Optional[Dict], base: Dict, images: int = MIN_IMAGES_FOR_ADAPTED_BOXES,
                    margin: float = BOX_MARGIN) -> GateDecision:
    """The candidate measured with a box alone answered by the base decoder and by its own
    (`by_decoder`: "base"/"adapted" -> summary) on `images` validation images, judged each way.
    The way kept: a publishable one first, then the higher score; on a tie the base decoder (the
    default). Its own decoder only with MIN_IMAGES_FOR_ADAPTED_BOXES images; both are recorded."""
    decisions = {d: judge(summary, served, base, margin) for d, summary in by_decoder.items()}
    ways = list(by_decoder) if images >= MIN_IMAGES_FOR_ADAPTED_BOXES else ["base"]
    way = max(ways, key=lambda d: (decisions[d].publish, by_decoder[d]["score"], d == "base"))
    decision = decisions[way]
    decision.box_decoder = way
    decision.by_box_decoder = {d: {"box": s["box"], "score": s["score"]} for d, s in by_decoder.items()}
    decision.reason += f"; boxes by the {way} decoder"
    if len(ways) < len(by_decoder):
        decision.reason += (f" (its own answers boxes only once measured on {MIN_IMAGES_FOR_ADAPTED_BOXES} validation images; "
                            f"here {images}, box Dice {by_decoder['adapted']['box']:.3f})")
    return decision


def cases_from(items: Sequence[Dict]) -> List[Case]:
    # the id keys the evaluation's embedding cache: the datastore's own (a series UID has dots)
    return [Case(d.get("image_id") or Path(d["image"]).name.split(".")[0], d["image"], d["label"], dict(d.get("names") or {}))
            for d in items]


class Gate:
    """Measures the served version and the base model once (before training: it tells the run
    how long the candidate's measurement will take), then the candidate."""

    def __init__(self, weights_dir: Path, kind: str, backbone: str, val_items: Sequence[Dict], device: str = "cpu",
                 log: Callable[[str], None] = print, protocol: Protocol = GATE_PROTOCOL):
        self.weights_dir = Path(weights_dir)
        self.kind, self.backbone, self.device, self.log, self.protocol = kind, backbone, device, log, protocol
        self.cases = cases_from(val_items)
        self.references: Dict[str, Dict] = {}
        self.seconds_per_model = 0.0

    @property
    def can_measure(self) -> bool:
        return bool(self.cases)

    def measure_references(self) -> None:
        if not self.cases:
            return
        t0 = time.time()
        specs = {"base": base_spec(self.backbone)}
        if published_versions(self.weights_dir, self.kind, self.backbone):
            specs["served"] = ModelSpec(self.kind, str(self.weights_dir), "", self.backbone)
        report = evaluate_models(specs, self.cases, self.protocol, self.device, log=self.log)
        self.references = {name: entry["summary"] for name, entry in report["models"].items()}
        self.seconds_per_model = (time.time() - t0) / len(specs)

    @property
    def candidate_seconds(self) -> float:
        """What measuring a candidate will take: one model's time for the first way of answering
        its boxes; the second reuses its embeddings (decoder passes only: a fraction of the first,
        for which half is reserved)."""
        return self.seconds_per_model * 1.5

    def decide(self, candidate: Path) -> GateDecision:
        if not self.cases:
            return GateDecision(False, "no validation image: with a single saved label there is nothing the candidate "
                                       f"did not train on to measure it with (at least {MIN_LABELS} final labels are needed)")
        t0 = time.time()
        specs = {f"candidate, boxes by the {d} decoder": ModelSpec(self.kind, str(candidate.parent), str(candidate), self.backbone,
                                                                   boxes_on_base_decoder=d == "base")
                 for d in adapter_io.BOX_DECODERS}
        runtime = Runtime(2 << 30)  # one file both ways: the second reuses the first's embeddings
        try:
            report = evaluate_models(specs, self.cases, self.protocol, self.device, log=self.log, runtime=runtime)
        finally:
            runtime.stop()
        self.log("gate: candidate measured in " + ", ".join(f"{e['seconds']} s" for e in report["models"].values()))
        by_decoder = {d: report["models"][name]["summary"] for d, name in zip(adapter_io.BOX_DECODERS, specs)}
        decision = judge_both_ways(by_decoder, self.references.get("served"), self.references["base"], len(self.cases))
        decision.seconds = round(time.time() - t0, 1)
        return decision


def record_box_decoder(candidate: Path, box_decoder: str) -> None:
    """Write the gate's choice into the candidate's file: it is served (and published) so."""
    payload = adapter_io.read_adapter_file(candidate)
    payload["meta"]["box_decoder"] = box_decoder
    adapter_io.write_adapter_file(candidate, payload)


def candidate_path(weights_dir: Path, kind: str, backbone: str) -> Path:
    """The next free candidate name: adaptsam_<kind>_<backbone>_c<N>.pt under candidates/."""
    folder = Path(weights_dir) / CANDIDATES
    taken = [int(p.stem.rsplit("_c", 1)[1]) for p in folder.glob(f"adaptsam_{kind}_{backbone}_c*.pt") if p.stem.rsplit("_c", 1)[1].isdigit()]
    return folder / f"adaptsam_{kind}_{backbone}_c{max(taken, default=0) + 1}.pt"


def write_report(candidate: Path, decision: GateDecision) -> Path:
    path = candidate.with_suffix(".gate.json")
    path.write_text(json.dumps(decision.to_dict(), indent=1))
    return path


def list_candidates(weights_dir: Path, kind: str, backbone: str) -> List[Dict]:
    out = []
    for p in sorted(Path(weights_dir, CANDIDATES).glob(f"adaptsam_{kind}_{backbone}_c*.pt")):
        report = p.with_suffix(".gate.json")
        gate = json.loads(report.read_text()) if report.is_file() else {}
        out.append({"candidate": p.stem.rsplit("_", 1)[1], "file": p.name, "publish": gate.get("publish"), "reason": gate.get("reason"),
                    "scores": gate.get("scores", {})})
    return out


def publish_candidate(candidate: Path, weights_dir: Path, reason: str) -> Path:
    """Copy a candidate in as the next published version (by rename: readers never see half a
    file), recording why in its metadata."""
    payload = adapter_io.read_adapter_file(candidate)
    meta = payload["meta"]
    versions = published_versions(Path(weights_dir), meta["kind"], meta["backbone"])
    version = (versions[-1][0] if versions else 0) + 1
    meta.update(version=version, previous_version=versions[-1][0] if versions else 0, published_because=reason,
                candidate=candidate.name)
    target = Path(weights_dir) / published_name(meta["kind"], meta["backbone"], version)
    adapter_io.write_adapter_file(target, payload)
    return target


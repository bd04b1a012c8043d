"""Publish the average of adapter files as the next version (a "model soup" of runs from one adapter).

    python -m adaptsam.average --out model_weights RUN_A.pt RUN_B.pt RUN_C.pt

Each input is a training run's published file (`python -m adaptsam.train`); all must share one
base checkpoint, kind, adapter layout and carry_logits. The result is an ordinary adapter file:
the server serves it, rollback and retraining treat it like any other version, and its metadata
names the files it averages (with their SHA-256, options and training images).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .engine.models import published_name, published_versions
from .model import adapter_io
from .model.adapters import attach_adapters
from .model.backbones import build_model, file_sha256


def publish_average(paths, weights_dir: Path) -> Path:
    paths = [Path(p) for p in paths]
    state, metas = adapter_io.average_adapter_files(paths)
    first = metas[0]
    # load the average into the model it belongs to: that checks the base checkpoint installed
    # here is the one the runs trained on, and the file is written the way the trainer writes
    model = attach_adapters(build_model(first["backbone"], weights_dir=weights_dir), adapter_io.config_from_meta(first))
    adapter_io.load_adapter_state(first, state, model, source=str(paths[0]))
    versions = published_versions(weights_dir, first["kind"], first["backbone"])
    previous = versions[-1][0] if versions else 0  # the version it replaces in serving
    version = previous + 1
    path = weights_dir / published_name(first["kind"], first["backbone"], version)
    images = sorted({name for m in metas for name in m.get("training_images", [])})
    adapter_io.save_adapters(
        path, model, version,
        training_images=images,
        validation_images=[],
        images_seen=sorted(set().union(*(adapter_io.images_seen(m) for m in metas))),
        # unmeasured: no box_decoder record, so its boxes go to the base decoder (engine/prompts.py)
        options={"carry_logits": adapter_io.serving_mode(first)["carry_logits"]},
        averaged_from=[{"file": p.name, "sha256": file_sha256(p), "version": m.get("version"),
                        "previous_version": m.get("previous_version"), "options": m.get("options", {}),
                        "metrics": m.get("metrics", {}), "train_seconds": m.get("train_seconds")}
                       for p, m in zip(paths, metas)],
        previous_version=previous,
    )
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaptsam.average", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="adapter files to average (two or more)")
    ap.add_argument("--out", default="model_weights", help="weights folder to publish into (default: ./model_weights)")
    args = ap.parse_args(argv)
    path = publish_average(args.files, Path(args.out))
    print(f"published: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

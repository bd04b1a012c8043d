"""Train adapters from the command line on image/label pairs (what produced model_weights/).

    python -m adaptsam.train --kind 2d --samples .data/samples --images ct_3mm,mr_3mm \\
        --max-epochs 12 --out model_weights

The same trainer runs inside the server for `POST /train/adaptsam` (on the datastore's final
labels); this entry point takes the sample studies' silver labels instead.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from . import samples
from .model.backbones import default_weights_dir
from .trainers.loop import AdapterTrainer, TrainOptions


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaptsam.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=["2d", "3d"], default="2d")
    ap.add_argument("--samples", default=str(samples.default_samples_dir()))
    ap.add_argument("--images", default="ct_3mm,mr_3mm", help="comma-separated sample ids with reference labels")
    ap.add_argument("--out", default=str(default_weights_dir()), help="weights dir to publish into")
    ap.add_argument("--backbone", default="litemedsam")
    for name, default in (("max-epochs", 12), ("train-batch-size", 4), ("seed", 0), ("steps-per-epoch", 0), ("decoder-epochs", -1),
                          ("decoder-blocks", 0), ("decoder-lora-rank", -1)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--val-split", type=float, default=0.0)
    ap.add_argument("--max-minutes", type=float, default=0.0)
    ap.add_argument("--min-area", type=int, default=TrainOptions.min_area,
                    help="smallest object cross-section trained on, in pixels of the decoder's low-res grid")
    ap.add_argument("--min-area-fraction", type=float, default=TrainOptions.min_area_fraction,
                    help="... and at least this share of the object's largest cross-section")
    ap.add_argument("--protocol-clicks", type=float, default=TrainOptions.protocol_clicks,
                    help="share of simulated clicks placed as the benchmark's protocol places them")
    ap.add_argument("--box-consistency", type=float, default=0.0,
                    help="weight keeping box-only answers close to those of the adapter the run starts from")
    ap.add_argument("--field-mm", type=float, default=TrainOptions.field_mm,
                    help="also train on each volume as a field of view this wide (mm) shows it, when its own is narrower")
    ap.add_argument("--inner-clicks", action=argparse.BooleanOptionalAction, default=TrainOptions.inner_clicks,
                    help="random correction clicks inside error regions (at least half their depth), not on their rims")
    ap.add_argument("--no-resume", action="store_true", help="start from zero-initialised adapters")
    ap.add_argument("--carry-logits", action=argparse.BooleanOptionalAction, default=TrainOptions.carry_logits,
                    help="previous round's logits as the mask prompt of correction rounds")
    ap.add_argument("--guide-corrections", action=argparse.BooleanOptionalAction, default=TrainOptions.guide_corrections,
                    help="correction rounds after a first click also get the server's guide box")
    ap.add_argument("--carve-clicks", action=argparse.BooleanOptionalAction, default=TrainOptions.carve_clicks,
                    help="correction rounds carve the clicks into the carried logits, as the server does")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = Path(args.samples)
    samples.fetch(root)
    datalist = [
        {"image": str(samples.image_path(root, i)), "label": str(samples.reference_path(root, i))}
        for i in args.images.split(",")
    ]
    opts = TrainOptions(
        kind=args.kind, max_epochs=args.max_epochs, learning_rate=args.learning_rate, val_split=args.val_split,
        train_batch_size=args.train_batch_size, seed=args.seed, max_minutes=args.max_minutes,
        resume=not args.no_resume, steps_per_epoch=args.steps_per_epoch, decoder_epochs=args.decoder_epochs,
        decoder_blocks=args.decoder_blocks, decoder_lora_rank=args.decoder_lora_rank, carry_logits=args.carry_logits,
        box_consistency=args.box_consistency, min_area=args.min_area, min_area_fraction=args.min_area_fraction,
        protocol_clicks=args.protocol_clicks, guide_corrections=args.guide_corrections,
        carve_clicks=args.carve_clicks, field_mm=args.field_mm, inner_clicks=args.inner_clicks,
    )
    result = AdapterTrainer(datalist, opts, Path(args.out), args.backbone, log=print).run()
    print(f"published: {result.published} (version {result.version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

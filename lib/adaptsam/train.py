"""Train adapters from the command line on image/label pairs (how the shipped adapters were
made: model_weights/README.md).

    python -m adaptsam.train --kind 2d --pair IMAGE LABEL [--pair IMAGE LABEL ...] --out model_weights

The same trainer runs inside the server for `POST /train/adaptsam` on the datastore's final
labels. Every training option is a flag (`--help` lists them); the result is published into
`--out` as the next version of its kind.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .training.loop import AdapterTrainer
from .training.options import add_arguments, from_args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m adaptsam.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=2, action="append", metavar=("IMAGE", "LABEL"), required=True,
                    help="an image and its label map on the same grid (each label value is one object)")
    ap.add_argument("--out", default="model_weights", help="weights folder to publish into (default: ./model_weights)")
    ap.add_argument("--backbone", default="litemedsam")
    add_arguments(ap, val_split=0.0, max_epochs=12, publish="always")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    datalist = [{"image": str(Path(i).resolve()), "label": str(Path(lab).resolve())} for i, lab in args.pair]
    result = AdapterTrainer(datalist, from_args(args), Path(args.out), args.backbone, log=print).run()
    print(f"published: {result.published} (version {result.version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

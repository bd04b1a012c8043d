"""Train the 2D and 3D adapters from the sample data, in one command: the recipe that rebuilds
the shipped adapters (up to floating-point sums: model_weights/README.md).

    python tools/adapters.py build [--samples .data/samples] [--out .data/adapters]

About three hours on 2 CPU cores (2D 1 h, 3D 1 h 50 min), on the sample studies ``ct_3mm`` and
``mr_3mm`` with their silver labels (``ct_dicom`` stays out: it is the held-out ``ct_abdomen``
set of ``benchmarks/modalities.py``):

1. the 2D adapter (Medical SAM Adapter), from identity; then runs that continue from it with
   other seeds, averaged with it (a "model soup"): the shipped 2D v5;
2. the 3D adapter (MA-SAM), from identity, its decoder adapters seeded from stage 1's soup; then
   its own soup the same way: the shipped 3D v6.

Each stage's result is published into ``--out`` as the next version of its kind, with the
recipe's options in its metadata (an average records every input's). The default folder is not
``model_weights/``: a server serves the newest version there, and nothing is measured or gated
here; ``benchmarks/modalities.py`` measures the output against the shipped files
(docs/experiments.md). Fixed epoch and step counts, no time budget, fixed seeds: a rerun
repeats the same optimisation, up to floating-point sums, which differ between CPUs and thread
counts and then grow over a run's steps.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import samples

TRAINING_STUDIES = ("ct_3mm", "mr_3mm")

# the fields every stage shares: from identity, every image trains, publish without the gate
COMMON = dict(resume=False, val_split=0.0, publish="always", max_minutes=0.0, seed=0, learning_rate=1e-3)

RECIPE = (
    ("2d", dict(max_epochs=14)),  # the first half on cached embeddings (decoder adapters only)
    ("3d", dict(max_epochs=10, decoder_epochs=1, decoder_blocks=2, train_batch_size=1, steps_per_epoch=40)),
)
# continuations of a stage's result, one per seed, each in a folder of its own holding a copy of
# it; the stage's result and theirs are averaged
SOUP = {
    "2d": dict(seeds=(1, 2, 3), options=dict(resume=True, max_epochs=5)),
    "3d": dict(seeds=(1, 2, 3), options=dict(resume=True, max_epochs=4)),
}


def stage_options(kind: str, overrides: Optional[Dict] = None):
    from adaptsam.training.options import TrainOptions

    fields = {**COMMON, **dict(RECIPE)[kind], **(overrides or {})}
    return TrainOptions(kind=kind, **fields)


def _train(datalist, opt, folder: Path, log) -> Path:
    from adaptsam.training.loop import AdapterTrainer

    result = AdapterTrainer(datalist, opt, folder, "litemedsam", log=log).run()
    if not result.published:
        raise SystemExit(f"{opt.kind} run into {folder} published nothing")
    return Path(result.published)


def soup(kind: str, first: Path, datalist, out: Path, overrides: Optional[Dict], log) -> Path:
    """Continue from `first` once per seed of SOUP[kind], then publish the average of `first`
    and the continuations into `out` as the next version."""
    from adaptsam.average import publish_average

    runs = []
    for seed in SOUP[kind]["seeds"]:
        folder = out / "soup" / f"{kind}_seed{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        shutil.copy2(first, folder)
        opt = stage_options(kind, {**SOUP[kind]["options"], "seed": seed, **(overrides or {})})
        log(f"== {kind} continuation, seed {seed}: {opt.to_dict()}")
        runs.append(_train(datalist, opt, folder, log))
    return publish_average([first, *runs], out)


def build(samples_dir: Path, out: Path, overrides: Optional[Dict] = None, stages=tuple(dict(RECIPE)),
          log=print) -> List[Path]:
    """Run the recipe's stages into `out`; each stage's result, in order. `overrides` and
    `stages` (tests) replace option values in every run and pick stages."""

    if not samples.is_complete(samples_dir):
        raise SystemExit(f"no complete samples in {samples_dir}: run `make samples` first")
    out.mkdir(parents=True, exist_ok=True)
    datalist = samples.training_datalist(samples_dir, TRAINING_STUDIES)
    published = []
    for kind in stages:
        opt = stage_options(kind, overrides)
        log(f"== stage {kind}: {opt.to_dict()}")
        path = _train(datalist, opt, out, log)
        if kind in SOUP:
            path = soup(kind, path, datalist, out, overrides, log)
        published.append(path)
        log(f"== stage {kind}: {path}")
    return published


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/adapters.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the 2D, then the 3D adapter from the sample studies")
    b.add_argument("--samples", type=Path, default=samples.default_samples_dir())
    b.add_argument("--out", type=Path, default=Path(".data/adapters"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for path in build(args.samples, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

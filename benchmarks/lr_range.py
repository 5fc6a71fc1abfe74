"""Learning-rate range tests (Leslie Smith) for the three notebooks' recipes.

For each norm: a fresh network of its notebook's recipe and seed, trained with the recipe's SGD
(Nesterov momentum, weight decay, the recipe's norm/depthwise decay settings) for up to --steps
batches while the lr grows geometrically from --lr-min to --lr-max, through utils.lr_range_record
(the same call as the notebooks' range-test cell).
Writes one JSON file with a record per norm (every step's lr, loss and smoothed loss, where the
smoothed loss fell fastest and where it was lowest, the recipe's own peak lr); render_report draws
doc/lr_range.png and README section 4's table from it.

    python benchmarks/lr_range.py --data ../shared/data/cifar10-jpeg.tar.gz --out doc/results/lr-range.json

With --norms, only those norms' records are replaced; the file keeps the others.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import utils  # noqa: E402
from model import NORMS  # noqa: E402

NOTEBOOK_SEED = 1   # the seed every notebook trains with


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="a CIFAR-10 copy for utils.load_cifar10 (default: S8_DATA or the download)")
    parser.add_argument("--out", default="doc/results/lr-range.json")
    parser.add_argument("--norms", default="bn,ln,gn", help="comma-separated, of " + ", ".join(NORMS))
    # default: utils.lr_range_record's, the notebooks' setting
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr-min", type=float)
    parser.add_argument("--lr-max", type=float)
    args = parser.parse_args(argv)
    norms = args.norms.split(",")
    unknown = [n for n in norms if n not in NORMS]
    if unknown:
        parser.error(f"unknown norms {unknown}: choose from {', '.join(NORMS)}")
    device = utils.pick_device()
    data = utils.load_cifar10(args.data)
    given = {k: v for k, v in dict(steps=args.steps, lr_min=args.lr_min, lr_max=args.lr_max).items() if v is not None}
    records = []
    for norm in norms:
        records.append(utils.lr_range_record(data, norm, utils.recipe_for(norm), device, seed=NOTEBOOK_SEED, **given))
        r = records[-1]
        print(f"{norm}: steepest fall at lr {r['lr_steepest']:.3g}, lowest loss at lr {r['lr_at_min']:.3g}, "
              f"recipe peak {r['recipe_lr']:g} ({len(r['lr'])} steps, {r['seconds']:.0f} s)")
    # the file holds one record per norm: those of the norms not run here are kept as they were
    out = Path(args.out)
    kept = [r for r in (json.loads(out.read_text()) if out.exists() else []) if r["norm"] not in norms]
    records = sorted(kept + records, key=lambda r: list(NORMS).index(r["norm"]))
    utils.save_json(args.out, records, indent=None)    # per-step lists: one line each
    print("wrote", args.out)


if __name__ == "__main__":
    main()

"""Why normalise at all? The notebooks' network without a norm and with each norm: short runs of
the notebooks' recipe, and each 3x3 block's output scale and weight gradient at initialisation and
after training (utils.depth_stats, on one fixed batch of test images).

The runs are short (--epochs on --train-subset images) and use no weight average (ema=0: a short
run takes too few steps for it to forget its random start); otherwise the recipe is the notebooks'.
If the network without a norm stays at chance at the recipe's peak lr, it is trained again at the
lr where an lr range test (utils.lr_range_record) finds the loss falling fastest. --change sets
Recipe fields as benchmarks/sweep.py's does:

    python benchmarks/why_normalise.py --data ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/why_normalise.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --out doc/results/why-normalise-separable-skips.json --change build=separable-skips --change whiten_c1=true

The second is the build without weight standardization (itself a normalisation, of the weights),
with the whitened C1.
"""
import argparse
import math
import os
import sys
from dataclasses import replace
from multiprocessing import get_context

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

import utils  # noqa: E402
from sweep import parse_change  # noqa: E402
from model import SPATIAL_BLOCKS, count_parameters  # noqa: E402

NORMS = ("none", "bn", "ln", "gn")
PROBE = 256     # test images in the fixed batch the statistics are read on


def short_recipe(norm, epochs, lr=None, **changes):
    recipe = replace(utils.recipe_for(norm), epochs=epochs, ema=0.0, **changes)
    return recipe if lr is None else replace(recipe, lr=lr)


def at_chance(history):
    """A run that ended no better than chance (10 classes), or whose loss stopped being a number."""
    return history[-1]["test_acc"] <= 15.0 or not all(math.isfinite(h["train_loss"]) for h in history)


def run(data, norm, seed, recipe, device, train_subset):
    """One short run: statistics at initialisation, training, statistics again."""
    utils.set_seed(seed)
    model = recipe.make_model(norm).to(device)
    train, test = utils.make_loaders(data, recipe, device, seed=seed, train_subset=train_subset)
    # a seeded random batch: the JPEG copy stores the test set class by class, so its first images are one class
    x, y = utils.subset(test.images, test.labels, PROBE, seed=0)
    init = utils.depth_stats(model, x, y)
    history = utils.fit(model, train, test, recipe, progress=False)
    trained = utils.depth_stats(model, x, y)
    return dict(norm=norm, seed=seed, lr=recipe.lr, params=count_parameters(model),
                final=history[-1]["test_acc"], at_chance=at_chance(history), history=history,
                init=init, trained=trained)


def worker(args):
    data_path, norm, seeds, epochs, train_subset, changes = args
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(NORMS)))
    data, device = utils.load_cifar10(data_path), utils.pick_device()
    recipe = short_recipe(norm, epochs, **changes)
    runs = [run(data, norm, s, recipe, device, train_subset) for s in seeds]
    range_test = None
    if norm == "none" and all(r["at_chance"] for r in runs):
        range_test = utils.lr_range_record(data, norm, recipe, device, seed=seeds[0], train_subset=train_subset,
                                           progress=False)
        # the range test's steepest fall, where that is below the recipe's peak; else a tenth of the peak
        steepest = range_test["lr_steepest"]
        lower = short_recipe(norm, epochs, **changes, lr=round(steepest if steepest < recipe.lr else recipe.lr / 10, 4))
        runs += [run(data, norm, s, lower, device, train_subset) for s in seeds]
    return runs, range_test, utils.device_name(device), data.source


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a local CIFAR-10 copy (see utils.load_cifar10)")
    p.add_argument("--out", default="doc/results/why-normalise.json")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--change", action="append", default=[], metavar="FIELD=VALUE", help="a Recipe field changed")
    a = p.parse_args(argv)
    changes = dict(parse_change(c) for c in a.change)
    seeds = [int(s) for s in a.seeds.split(",")]
    utils.load_cifar10(a.data)          # decode once; the workers read the cache
    with get_context("spawn").Pool(len(NORMS)) as pool:
        results = pool.map(worker, [(a.data, n, seeds, a.epochs, a.train_subset, changes) for n in NORMS])
    runs = [r for rs, *_ in results for r in rs]
    range_tests = [t for _, t, *_ in results if t is not None]
    record = dict(norms=list(NORMS), blocks=list(SPATIAL_BLOCKS), seeds=seeds, epochs=a.epochs,
                  train_subset=a.train_subset, probe_images=PROBE, probe_pick="random, seed 0",
                  recipe_lr=utils.recipe_for("bn").lr,
                  recipe=utils.recipe_dict(short_recipe("bn", a.epochs, **changes)),
                  device=results[0][2], data=results[0][3], runs=runs,
                  lr_range=[{k: v for k, v in t.items() if k not in ("lr", "loss", "smoothed")} for t in range_tests])
    utils.save_json(a.out, record)
    for r in runs:
        print(r["norm"], r["seed"], r["lr"], r["final"], "at chance" if r["at_chance"] else "")


if __name__ == "__main__":
    main()

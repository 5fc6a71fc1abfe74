"""How does each norm fare at small batch sizes? The lesson of GroupNorm's paper, measured here.

BatchNorm normalises with statistics pooled over the batch; at batch 2 they are those of two images,
noisy in training and unlike the running averages it tests with. LayerNorm and GroupNorm normalise
each image on its own, so their arithmetic does not change with the batch. This script trains the
notebooks' build and recipe (utils.recipe_for: the same for every norm) with each norm at several
batch sizes and writes one JSON line per run.

To keep a sweep affordable on a CPU, every run is short and identical apart from the batch: the
first `--train-subset` training images (utils.subset with the seed), `--epochs` epochs, the full test
set. The learning rate follows the linear scaling rule, recipe lr x batch / 64 (the notebooks train
at batch 64), as GroupNorm's paper did, so every batch size takes the same noise per image; the
moving average of the weights is off (`ema=0`: a short run at a large batch takes too few steps for
it to forget its random start), the rest is the notebooks' recipe. Runs already in --out are skipped,
so a cut-off sweep resumes where it stopped.

    # two seeds side by side, one core each, each to its own file (two writers of one file would
    # lose each other's lines), joined afterwards
    for seed in 1 2; do python benchmarks/batch_size.py --data DATA --threads 1 \\
        --out batch-size-$seed.jsonl --seed $seed & done; wait
    cat batch-size-1.jsonl batch-size-2.jsonl > doc/results/batch-size.jsonl
"""
import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import records  # noqa: E402
import utils  # noqa: E402


def batch_recipe(norm, batch_size, epochs):
    """The notebooks' recipe for `norm` at `batch_size`, lr scaled linearly from the notebooks' own
    batch (64 today), no weight average."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: a batch holds at least one image; choose 1 or more")
    recipe = utils.recipe_for(norm)
    return replace(recipe, batch_size=batch_size, lr=recipe.lr * batch_size / recipe.batch_size,
                   epochs=epochs, ema=0.0)


def run(data, norm, batch_size, epochs, train_subset, seed, device, progress=False):
    """One short run of `batch_recipe`; returns its record (the history with what it trained)."""
    recipe, base = batch_recipe(norm, batch_size, epochs), utils.recipe_for(norm).batch_size
    utils.set_seed(seed)
    model = recipe.make_model(norm).to(device)
    train, test = utils.make_loaders(data, recipe, device, seed=seed, train_subset=train_subset,
                                     test_batch_size=500)
    return dict(norm=norm, build=recipe.build, batch_size=batch_size, base_batch=base, seed=seed,
                epochs=epochs,
                train_subset=train_subset, lr=recipe.lr, data=data.source, recipe=utils.recipe_dict(recipe),
                **records.fit_record(model, train, test, recipe, progress=progress))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a local CIFAR-10 copy (see utils.load_cifar10); "
                   "default: $S8_DATA, else torchvision's download into data/")
    p.add_argument("--out", required=True, help="JSON-lines file each run's record is appended to")
    p.add_argument("--norms", default="bn,gn,ln")
    p.add_argument("--batches", default="2,4,8,16,32,64", help="comma-separated batch sizes")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=8000, help="training images per run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads; 1 lets two seeds run side by side, one core each (small batches "
                        "gain little from a second thread)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    a = p.parse_args(argv)
    norms = a.norms.split(",")
    unknown = [n for n in norms if n not in utils.NORMS]
    if unknown:
        p.error(f"unknown norm(s) {unknown}: choose from {sorted(utils.NORMS)}")
    try:
        batches = [int(b) for b in a.batches.split(",")]
        for b in batches:
            batch_recipe("bn", b, a.epochs)
    except ValueError as e:
        p.error(f"--batches {a.batches!r}: {e}")
    done = {(r["norm"], r["batch_size"], r["seed"], r["epochs"], r["train_subset"])
            for r in records.read_jsonl(a.out)}
    todo = [(n, b) for b in batches for n in norms
            if (n, b, a.seed, a.epochs, a.train_subset) not in done]
    for n, b in todo:
        r = batch_recipe(n, b, a.epochs)
        print(f"{n} batch {b} lr {r.lr:g}: {a.epochs} epochs on {a.train_subset} images, seed {a.seed}")
    if a.dry_run or not todo:
        return
    torch.set_num_threads(a.threads)
    data, device = utils.load_cifar10(a.data), utils.pick_device()
    for n, b in todo:
        record = run(data, n, b, a.epochs, a.train_subset, a.seed, device, progress=True)
        records.append_jsonl(a.out, record)
        print(n, "batch", b, "->", record["final"], f"({record['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()

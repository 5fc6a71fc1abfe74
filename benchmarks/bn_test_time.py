"""BatchNorm at test time: what forgetting model.eval() does, measured.

In eval mode BatchNorm normalises with the running averages it kept in training, so an image's
output does not depend on the other images of its batch. In train mode it uses the statistics of
the batch at hand: on a shuffled batch of many images those are close to the averages, on a small
batch they are noisy, and on a batch of one class they are that class's statistics, not the data
set's. This script trains one BatchNorm network (the notebooks' build and recipe, a short run
without the weight average), then tests it on the whole test set three ways at each --batches size:
eval mode; train mode on shuffled batches; train mode on batches of a single class (the test set
sorted by class, as the JPEG copy stores it). Train mode is model.train(), as forgetting eval() leaves
it: BatchNorm on batch statistics and the 2% dropout on. Every train-mode test runs on a copy, so
none moves the running averages of another.

    python benchmarks/bn_test_time.py --data DATA
"""
import argparse
import copy
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import records  # noqa: E402
import utils  # noqa: E402


@torch.no_grad()
def accuracy(model, images, labels, batch_size, train_mode):
    """Test accuracy (%) over images in the order given, batch by batch, in train or eval mode."""
    model.train(train_mode)
    correct = 0
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        correct += (model(x).argmax(1) == y).sum().item()
    return 100.0 * correct / len(labels)


def test_time_rows(model, test_loader, batches, seed=0):
    """One row per batch size: accuracy in eval mode, and in train mode on shuffled and on one-class
    batches (each train-mode test on its own copy of the model)."""
    images, labels = test_loader.images, test_loader.labels
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    by_class = torch.sort(labels, stable=True).indices
    rows = []
    for b in batches:
        rows.append(dict(
            batch_size=b, eval_mode=accuracy(model, images, labels, b, train_mode=False),
            train_mode_shuffled=accuracy(copy.deepcopy(model), images[shuffled], labels[shuffled], b, True),
            train_mode_one_class=accuracy(copy.deepcopy(model), images[by_class], labels[by_class], b, True)))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a local CIFAR-10 copy (see utils.load_cifar10)")
    p.add_argument("--out", default="doc/results/bn-test-time.json")
    p.add_argument("--batches", default="8,64", help="comma-separated test batch sizes")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=20000)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    data, device = utils.load_cifar10(a.data), utils.pick_device()
    recipe = replace(utils.recipe_for("bn"), epochs=a.epochs, ema=0.0)
    utils.set_seed(a.seed)
    model = recipe.make_model("bn").to(device)
    train, test = utils.make_loaders(data, recipe, device, seed=a.seed, train_subset=a.train_subset)
    fitted = records.fit_record(model, train, test, recipe, progress=True)
    rows = test_time_rows(model, test, [int(b) for b in a.batches.split(",")])
    record = dict(norm="bn", build=recipe.build, seed=a.seed, epochs=a.epochs, train_subset=a.train_subset,
                  data=data.source, recipe=utils.recipe_dict(recipe), rows=rows, **fitted)
    utils.save_json(a.out, record)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()

"""Why normalise at all? The learning rates each arm tolerates, and the signal's scale through depth.

Five arms train the same network (--build, the assignment's `reference` network by default) with the
notebooks' recipe: no norm with PyTorch's default init, no norm with He init (model.init_weights), and
BatchNorm, LayerNorm and GroupNorm (default init). Without a norm every conv has a bias where the
norm's shift was, and the build has no weight standardization. Each arm runs at every peak lr of a
geometric grid (--lrs), with several seeds: short runs (--epochs on --train-subset training images,
tested on --test-subset test images), without the weight average (ema=0: a short run takes too few
steps for it to forget its random start). Each run also records, per 3x3 block, the std of the
block's output and the norm of its conv weights' gradient (depth_stats) at initialisation and
after training, on one seeded random batch of test images.

One JSON line per finished run is appended to --out; runs already there are skipped, so a cut-off
study resumes. benchmarks/report.py reads the file for the README's table and figure.

    python benchmarks/why_normalise.py --data DATA
"""
import argparse
import math
import os
import sys
from dataclasses import replace
from multiprocessing import get_context

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

import records  # noqa: E402
import utils  # noqa: E402
from model import SPATIAL_BLOCKS, Net  # noqa: E402

# (arm, norm, init): the no-norm network twice, the norms with PyTorch's default init
ARMS = (("none-default", "none", "default"), ("none-he", "none", "he"),
        ("bn", "bn", "default"), ("ln", "ln", "default"), ("gn", "gn", "default"))
LRS = tuple(float(f"{lr:.3g}") for lr in np.geomspace(0.003, 0.8, 8))   # 0.003 ... 0.8, x2.2 a step
PROBE = 256           # test images in the fixed batch the depth statistics are read on
# the test accuracy (%) a run must pass, with finite losses, to count as training: twice chance
TRAINS_ABOVE = 20.0


def depth_stats(model, x, y):
    """Per 3x3 block (C1 ... C9) on one batch: the std of the block's output (a forward hook) and the
    norm of the loss's gradient for the block's conv weights (hooks run as each gradient is
    accumulated). One forward and backward pass in train mode, no step (BatchNorm's running averages
    do take the batch in)."""
    act_std, grad_sq, handles = {}, dict.fromkeys(SPATIAL_BLOCKS, 0.0), []
    for name in SPATIAL_BLOCKS:
        block = getattr(model.layers, name)
        handles.append(block.register_forward_hook(
            lambda _m, _inp, out, name=name: act_std.__setitem__(name, out.detach().float().std().item())))
        def add_grad(p, name=name):
            grad_sq[name] += p.grad.float().pow(2).sum().item()
        handles += [p.register_post_accumulate_grad_hook(add_grad) for p in block.conv.parameters()]
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        loss, _ = utils.batch_loss(model, x, y)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return dict(blocks=list(SPATIAL_BLOCKS), act_std=[act_std[n] for n in SPATIAL_BLOCKS],
                grad_norm=[math.sqrt(grad_sq[n]) for n in SPATIAL_BLOCKS], loss=loss.item())


def trained(history):
    """Whether a run ended well above chance (10 classes) with every loss a number."""
    finite = all(math.isfinite(h[k]) for h in history for k in ("train_loss", "test_loss"))
    return finite and history[-1]["test_acc"] > TRAINS_ABOVE


def arm_recipe(norm, init, lr, epochs, build):
    recipe = replace(utils.recipe_for(norm), build=build, init=init, lr=lr, epochs=epochs, ema=0.0)
    Net(norm, groups=recipe.groups, build=build)      # a bad build or group count fails here
    return recipe


def run(data, spec, device):
    """One short run: depth statistics at initialisation, training, depth statistics again."""
    recipe = records.recipe_from_dict(spec["recipe"])
    utils.set_seed(spec["seed"])
    model = recipe.make_model(spec["norm"]).to(device)
    train, test = utils.make_loaders(data, recipe, device, seed=spec["seed"],
                                     train_subset=spec["train_subset"], test_subset=spec["test_subset"])
    # a seeded random batch: the JPEG copy stores the test set class by class, so its first images
    # are one class
    x, y = utils.subset(test.images, test.labels, PROBE, seed=0)
    at_init = depth_stats(model, x, y)
    fitted = records.fit_record(model, train, test, recipe)
    return dict(spec, data=data.source, trained=trained(fitted["history"]), depth_init=at_init,
                depth_trained=depth_stats(model, x, y), **fitted)


WORKER_DATA = None      # each worker process's data set, loaded once by start_worker


def start_worker(data_path):
    global WORKER_DATA
    torch.set_num_threads(1)      # one thread per worker: the workers share the cores
    WORKER_DATA = utils.load_cifar10(data_path)


def worker(spec):
    return run(WORKER_DATA, spec, utils.pick_device())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a local CIFAR-10 copy (see utils.load_cifar10)")
    p.add_argument("--out", default="doc/results/why-normalise-lr.jsonl")
    p.add_argument("--build", default="reference")
    p.add_argument("--arms", default=",".join(a for a, _, _ in ARMS))
    p.add_argument("--lrs", default=",".join(map(str, LRS)), help="comma-separated peak learning rates")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--test-subset", type=int, default=5000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    a = p.parse_args(argv)
    arms = {name: (norm, init) for name, norm, init in ARMS}
    unknown = [x for x in a.arms.split(",") if x not in arms]
    if unknown:
        p.error(f"unknown arm(s) {unknown}: choose from {list(arms)}")
    done = {(r["arm"], r["lr"], r["seed"], r["epochs"], r["train_subset"], r["build"])
            for r in records.read_jsonl(a.out)}
    specs = []
    for seed in map(int, a.seeds.split(",")):
        for lr in map(float, a.lrs.split(",")):
            for arm in a.arms.split(","):
                norm, init = arms[arm]
                if (arm, lr, seed, a.epochs, a.train_subset, a.build) in done:
                    continue
                recipe = arm_recipe(norm, init, lr, a.epochs, a.build)
                specs.append(dict(arm=arm, norm=norm, init=init, lr=lr, seed=seed, build=a.build,
                                  epochs=a.epochs, train_subset=a.train_subset, test_subset=a.test_subset,
                                  probe_images=PROBE, probe_pick="random, seed 0",
                                  recipe=utils.recipe_dict(recipe)))
    print(f"{len(specs)} runs to do on {a.workers} workers", flush=True)
    if a.dry_run or not specs:
        return
    utils.load_cifar10(a.data)          # decode once; the workers read the cache
    with get_context("spawn").Pool(a.workers, initializer=start_worker, initargs=(a.data,)) as pool:
        for r in pool.imap_unordered(worker, specs):
            records.append_jsonl(a.out, r)
            print(f"{r['arm']:>12} lr {r['lr']:<6g} seed {r['seed']}: {r['final']:5.2f}% "
                  f"{'' if r['trained'] else '(did not train) '}{r['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()

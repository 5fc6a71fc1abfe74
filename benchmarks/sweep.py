"""Many full trainings through utils, for choosing the recipe and measuring seed variance.

Runs each configuration of a grid (and then the chosen ones with more seeds) in parallel
worker processes sharing one GPU, and writes one JSON line per finished run to --out, so a
cut-off sweep still leaves every finished result behind.

    python benchmarks/sweep.py --data path/to/cifar10-jpeg.tar.gz --out results.jsonl --grid grid
    # the next step, on a GPU: the stage-2 grid plus the notebooks' seeds 2 and 3
    python benchmarks/sweep.py --data ... --out doc/results/trials-separable.jsonl \
        --grid separable --notebook-seeds 2,3 --workers 8
    # on a lent GPU machine, many runs side by side under CUDA MPS (what stages 3 and 4 ran):
    bash benchmarks/gpu_sweep.sh tune 16 path/to/cifar10-jpeg.tar.gz
    # on a CPU: one notebook-recipe run with a change, e.g. weight standardization for LayerNorm
    python benchmarks/sweep.py --data ... --out doc/results/trials-tune.jsonl --notebook-seeds 1 \
        --norms ln --change build=separable-ws --workers 1
    # on a CPU: short proxies, one at a time
    python benchmarks/sweep.py --data ... --out doc/results/trials-proxy.jsonl --grid proxy --workers 1
"""
import argparse
import json
import os
import sys
from dataclasses import fields, replace
from multiprocessing import get_context

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import utils  # noqa: E402
from model import Net  # noqa: E402

WIDTHS = {
    "ref": (16, 32, 16, 32, 32, 32, 16, 16, 32, 32),
    "a": (16, 24, 16, 32, 32, 32, 16, 24, 32, 36),
    "b": (16, 32, 16, 24, 32, 32, 16, 24, 32, 40),
    "c": (12, 24, 16, 32, 32, 32, 16, 24, 32, 40),
    # with the 16x16 and 8x8 stages depthwise-separable (SEP_LOW): twice to three times as wide
    "s1": (16, 32, 32, 64, 64, 64, 48, 96, 96, 112),
    # every 3x3 block but C1 depthwise-separable (SEP_ALL)
    "s2": (32, 64, 32, 64, 64, 64, 48, 96, 96, 112),
}
SEP_LOW = ("C3", "C4", "C5", "C7", "C8", "C9")
SEP_ALL = ("C2",) + SEP_LOW

AUGMENT_FIELDS = tuple(f.name for f in fields(utils.Augment))     # the rest of a change is Recipe's


def pop_augment(changes):
    """The Augment fields taken out of a dict of changes (which keeps the Recipe fields)."""
    return {k: changes.pop(k) for k in AUGMENT_FIELDS if k in changes}


def trial(name, norm, seed=1, widths="ref", tail_padding=0, skips=False, dropout=0.02, groups=4,
          separable=(), **recipe):
    aug = pop_augment(recipe)
    build = dict(widths=widths, tail_padding=tail_padding, skips=skips, dropout=dropout)
    if separable:
        build["separable"] = list(separable)
    return dict(name=name, norm=norm, seed=seed, build=build, groups=groups, recipe=recipe,
                augment=aug)


def proxy(epochs=4):
    """Short CPU runs (seed 1, the notebooks' augmentation) that rank ideas before full runs."""
    nb = dict(lr=0.05, crop_pad=0, rotate_deg=10, rotate_p=0.1, epochs=epochs)
    return [
        trial(f"seed-like {epochs}ep", "bn", **nb),
        trial(f"s1 sep-low {epochs}ep", "bn", widths="s1", separable=SEP_LOW, **nb),
        trial(f"s2 sep-all {epochs}ep", "bn", widths="s2", separable=SEP_ALL, **nb),
    ]


def grid():
    """Stage 1: what moves the number, mostly on BN, then the norm-specific choices."""
    base = dict(lr=0.05, weight_decay=5e-4, label_smoothing=0.0, crop_pad=4, flip=0.5)
    t = []
    # the seed network and the seed-like recipe (rotation 10 deg at p=0.1, no crop, dropout .02)
    t.append(trial("seed-like", "bn", lr=0.05, crop_pad=0, rotate_deg=10, rotate_p=0.1))
    t.append(trial("ref", "bn", **base))
    t.append(trial("ref+ls", "bn", **{**base, "label_smoothing": 0.1}))
    t.append(trial("ref+ls,crop2", "bn", **{**base, "label_smoothing": 0.1, "crop_pad": 2}))
    t.append(trial("ref+ls,drop0", "bn", dropout=0.0, **{**base, "label_smoothing": 0.1}))
    t.append(trial("ref+tail", "bn", tail_padding=1, dropout=0.0, **{**base, "label_smoothing": 0.1}))
    t.append(trial("ref+tail+skips", "bn", tail_padding=1, skips=True, dropout=0.0,
                   **{**base, "label_smoothing": 0.1}))
    arch = dict(tail_padding=1, skips=True, dropout=0.0)
    rec = {**base, "label_smoothing": 0.1}
    for w in ("a", "b", "c"):
        t.append(trial(f"w{w}+tail+skips", "bn", widths=w, **arch, **rec))
    for lr in (0.02, 0.1, 0.2):
        t.append(trial(f"ref+tail+skips lr{lr}", "bn", **arch, **{**rec, "lr": lr}))
    for wd in (1e-4, 1e-3):
        t.append(trial(f"ref+tail+skips wd{wd}", "bn", **arch, **{**rec, "weight_decay": wd}))
    t.append(trial("ref+tail+skips bs256 lr0.1", "bn", **arch, **{**rec, "batch_size": 256, "lr": 0.1}))
    t.append(trial("ref+tail+skips bs64", "bn", **arch, **{**rec, "batch_size": 64}))
    t.append(trial("ref+tail+skips crop2", "bn", **arch, **{**rec, "crop_pad": 2}))
    t.append(trial("ref+tail+skips drop0.05", "bn", **{**arch, "dropout": 0.05}, **rec))
    # LayerNorm and GroupNorm: the same recipe, the width variant, and GN's group count
    for norm in ("ln", "gn"):
        t.append(trial("ref", norm, **base))
        t.append(trial("ref+tail+skips", norm, **arch, **rec))
        t.append(trial("wb+tail+skips", norm, widths="b", **arch, **rec))
        t.append(trial("ref+tail+skips lr0.1", norm, **arch, **{**rec, "lr": 0.1}))
    for g in (2, 8):
        t.append(trial(f"ref+tail+skips g{g}", "gn", groups=g, **arch, **rec))
    return t


def separable_grid():
    """Stage 2 (for a GPU): 20-epoch runs around the separable build, all three norms."""
    nb = dict(lr=0.05, crop_pad=0, rotate_deg=10, rotate_p=0.1)     # the notebooks' recipe at batch 128
    s1 = dict(widths="s1", separable=SEP_LOW)
    t = []
    for norm in ("bn", "gn", "ln"):
        t.append(trial("s1", norm, **s1, **nb))
        t.append(trial("s2 sep-all", norm, widths="s2", separable=SEP_ALL, **nb))
        t.append(trial("s1 drop0", norm, **{**s1, "dropout": 0.0}, **nb))
        t.append(trial("s1 lr0.1", norm, **s1, **{**nb, "lr": 0.1}))
        t.append(trial("s1 wd1e-4", norm, **s1, **{**nb, "weight_decay": 1e-4}))
        t.append(trial("s1 crop2", norm, **s1, **{**nb, "crop_pad": 2}))
        t.append(trial("s1 tail+skips", norm, **{**s1, "tail_padding": 1, "skips": True}, **nb))
        t.append(trial("s1 bs64", norm, **s1, **{**nb, "batch_size": 64}))
    t.append(trial("s1 lr0.2", "bn", **s1, **{"lr": 0.2, **{k: v for k, v in nb.items() if k != "lr"}}))
    t.append(trial("s1 ls0.1", "bn", **s1, **{**nb, "label_smoothing": 0.1}))
    for g in (2, 8):
        t.append(trial(f"s1 g{g}", "gn", groups=g, **s1, **nb))
    return t


CHANGE_TYPES = {f.name: f.type for f in fields(utils.Recipe) + fields(utils.Augment) if f.name != "augment"}


def parse_change(text):
    """One --change FIELD=VALUE as (field, value), the value converted to the field's type, so that
    `decay_norms=False` is the bool False (a string "False" would be true) and a typo fails here
    instead of training the unchanged recipe."""
    name, sep, value = text.partition("=")
    if not sep or name not in CHANGE_TYPES:
        raise ValueError(f"--change {text!r}: expected FIELD=VALUE with FIELD one of {sorted(CHANGE_TYPES)}")
    kind = CHANGE_TYPES[name]
    if kind is bool:
        flags = {"true": True, "1": True, "false": False, "0": False}
        if value.lower() not in flags:
            raise ValueError(f"--change {text!r}: {name} takes true or false")
        return name, flags[value.lower()]
    if name == "dropout" and value.lower() == "none":
        return name, None                                  # the build's own dropout
    try:
        return name, kind(value)
    except ValueError:
        raise ValueError(f"--change {text!r}: {name} takes {kind.__name__} values, not {value!r}") from None


def notebook_runs(seeds, norms=("bn", "ln", "gn"), **changes):
    """Each norm's notebook recipe (utils.recipe_for), or that recipe with `changes` (Recipe or
    Augment fields), with these seeds: the variance runs, and the tuning runs whose seeds 2 and 3
    count for a notebook once it trains the same recipe."""
    aug = pop_augment(changes)
    runs = []
    for n in norms:
        base = utils.recipe_for(n)
        recipe = replace(base, augment=replace(base.augment, **aug), **changes)
        runs += [dict(name="notebook", norm=n, seed=s, groups=recipe.groups, notebook_build=recipe.build,
                      notebook_recipe=utils.recipe_dict(recipe)) for s in seeds]
    return runs


def tune_grid():
    """Stage 3 (for a GPU), in priority order: single changes to the notebooks' recipe (batch 64,
    separable build), three seeds each for GroupNorm, which is 0.15 points short of its target,
    then one seed each for BatchNorm; builds with tail padding and skips, or every block separable."""
    nb = dict(batch_size=64, lr=0.05, crop_pad=0, rotate_deg=10, rotate_p=0.1)
    gn = lambda seeds, **c: notebook_runs(seeds, ("gn",), **c)         # noqa: E731
    bn = lambda **c: notebook_runs([1], ("bn",), **c)                  # noqa: E731
    return [*gn([1], lr=0.1), *gn([1], weight_decay=1e-3), *gn([1], dropout=0.0),
            *bn(lr=0.1), *bn(weight_decay=1e-3),
            *gn([2, 3], lr=0.1), *gn([2, 3], weight_decay=1e-3),
            # with a GPU that runs more at once (MPS)
            *gn([2, 3], dropout=0.0), *gn([1]), *bn(), *bn(dropout=0.0),
            trial("s1 bs64 tail+skips", "bn", widths="s1", separable=SEP_LOW, tail_padding=1, skips=True, **nb),
            trial("s2 sep-all bs64", "bn", widths="s2", separable=SEP_ALL, **nb),
            *bn(label_smoothing=0.1), *bn(crop_pad=2), *bn(warmup=0.15)]


def tune2_grid():
    """Stage 4 (for a GPU), after stage 3 moved nothing: weight standardization, lower weight decay
    and peak lr, three seeds each for GroupNorm, and the GPU's own seeds 2 and 3 of the unchanged
    recipe to compare them with."""
    gn = lambda seeds, **c: notebook_runs(seeds, ("gn",), **c)         # noqa: E731
    return [*gn([1, 2, 3], build="separable-ws"), *gn([1, 2, 3], weight_decay=2.5e-4),
            *gn([2, 3]), *notebook_runs([1, 2], ("ln",), build="separable-ws"),
            *notebook_runs([1, 2], ("bn",), build="separable-ws"), *gn([1, 2], lr=0.03),
            *notebook_runs([1], ("bn", "ln"), weight_decay=2.5e-4)]


def model_and_recipe(spec):
    """The network (channels_last, on the CPU) and the Recipe a sweep run trains."""
    if spec["name"].startswith("notebook"):            # exactly what the notebooks train
        recipe = utils.recipe_from_dict(spec["notebook_recipe"])
        return recipe.make_model(spec["norm"]), recipe
    b = dict(spec["build"])
    b["widths"] = WIDTHS[b["widths"]]
    b["separable"] = tuple(b.get("separable", ()))
    # a trial's recipe is its changes to the grids' base (doc/trials.md): batch 128, whatever
    # the notebooks' Recipe default is now, so that old and new records mean the same
    recipe = replace(utils.Recipe(groups=spec["groups"], **{"batch_size": 128, **spec["recipe"]}),
                     augment=utils.Augment(**{**dict(flip=0.5, crop_pad=4, rotate_deg=0, rotate_p=0),
                                              **spec["augment"]}))
    # channels_last like Recipe.make_model and make_loaders' images (benchmarks/speed.py)
    model = Net(spec["norm"], groups=spec["groups"], **b).to(memory_format=torch.channels_last)
    return model, recipe


def run_one(spec, data_path, device, threads=1, smoke=False, progress=False):
    torch.set_num_threads(threads)
    data = utils.load_cifar10(data_path)
    utils.set_seed(spec["seed"])
    model, recipe = model_and_recipe(spec)
    model = model.to(device)
    subsets = {}
    if smoke:
        recipe, subsets = replace(recipe, epochs=1), dict(train_subset=512, test_subset=512)
    train, test = utils.make_loaders(data, recipe, device, seed=spec["seed"], **subsets)
    return dict(spec, **utils.fit_record(model, train, test, recipe, progress=progress))


def worker(args):
    spec, data_path, threads, smoke, progress = args
    try:
        return run_one(spec, data_path, utils.pick_device(), threads, smoke, progress)
    except Exception as e:    # one broken config must not end the sweep
        return dict(spec, error=repr(e))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default=None, help="a local CIFAR-10 copy (folder or .tar.gz, see utils.load_cifar10); "
                   "default: $S8_DATA, else torchvision's download into data/")
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--seeds", default="2,3", help="the extra seeds for --seed-names")
    p.add_argument("--only", default=None, help="comma-separated trial names to keep")
    p.add_argument("--norms", default="bn,ln,gn", help="comma-separated norms to keep")
    p.add_argument("--grid", choices=["none", "grid", "separable", "tune", "tune2", "proxy"], default="none",
                   help="grid: full 20-epoch runs around the reference build; separable: full runs "
                        "around the separable build; proxy: short runs that rank ideas on a CPU")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument("--proxy-epochs", type=int, default=4)
    p.add_argument("--smoke", action="store_true", help="1 epoch on 512 training images per run: "
                   "checks that every run of the grid starts, in seconds")
    p.add_argument("--notebook-seeds", default="", help="comma-separated seeds: also run the "
                   "notebooks' recipe for every norm with these seeds")
    p.add_argument("--change", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --notebook-seeds: a Recipe or Augment field changed, e.g. "
                        "build=separable-ws or lr=0.1 (repeatable)")
    p.add_argument("--gn-groups", default="", help="also the notebooks' GroupNorm recipe with these "
                   "group counts (seed 1)")
    p.add_argument("--seed-names", default="", help="comma-separated trial names to rerun "
                   "with --seeds (for every norm that has them), after the grid")
    a = p.parse_args()
    specs = {"none": list, "grid": grid, "separable": separable_grid, "tune": tune_grid, "tune2": tune2_grid,
             "proxy": lambda: proxy(a.proxy_epochs)}[a.grid]()
    if a.only:
        keep = a.only.split(",")
        specs = [s for s in specs if s["name"] in keep]
    if a.notebook_seeds:
        changes = dict(parse_change(c) for c in a.change)
        specs += notebook_runs([int(s) for s in a.notebook_seeds.split(",")], **changes)
    if a.gn_groups:
        specs += [dict(run, name=f"notebook g{g}")
                  for g in a.gn_groups.split(",") if g for run in notebook_runs([1], ("gn",), groups=int(g))]
    again = a.seed_names.split(",") if a.seed_names else []
    specs += [dict(s, seed=int(seed)) for s in specs if s["name"] in again for seed in a.seeds.split(",")]
    specs = [s for s in specs if s["norm"] in a.norms.split(",")]
    print(f"{len(specs)} runs on {a.workers} workers", flush=True)
    if a.dry_run:
        for s in specs:
            changes = (utils.recipe_changes(utils.recipe_dict(utils.recipe_for(s["norm"])), s["notebook_recipe"],
                                             s["norm"])
                       if "notebook_recipe" in s else s.get("recipe", ""))
            print(s["norm"], s["name"], s["seed"], s.get("build", s.get("notebook_build")), changes)
        return
    utils.load_cifar10(a.data)          # decode once; the workers read the cache
    with get_context("spawn").Pool(a.workers) as pool, open(a.out, "a") as out:
        threads = max(1, (os.cpu_count() or 1) // a.workers)
        # one worker: its epochs are shown as they end (a CPU run takes half an hour); several
        # workers' lines would interleave, so they report each finished run only
        progress = a.workers == 1
        for r in pool.imap_unordered(worker, [(s, a.data, threads, a.smoke, progress) for s in specs]):
            out.write(json.dumps(r) + "\n")
            out.flush()
            print(r["norm"], r["name"], r.get("seed"), r.get("final", r.get("error")), r.get("seconds"),
                  flush=True)


if __name__ == "__main__":
    main()

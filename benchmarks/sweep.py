"""Many full trainings of the notebooks' recipe through utils: seeds, and single changes to it.

Each run trains utils.recipe_for(norm) with the --change fields applied, in parallel worker
processes (sharing one GPU where there is one), and appends one JSON line per finished run to
--out, so a cut-off sweep still leaves every finished result behind.

    # seeds 2 and 3 of the notebooks' recipe, all three norms
    python benchmarks/sweep.py --data DATA --out doc/results/trials-gpu.jsonl \
        --notebook-seeds 2,3
    # the assignment's network with the same recipe, one norm, on a CPU
    python benchmarks/sweep.py --data DATA --out ... --notebook-seeds 1 --norms bn \
        --change build=reference --workers 1
"""
import argparse
import os
import sys
from dataclasses import fields, replace
from multiprocessing import get_context

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

import records  # noqa: E402
import utils  # noqa: E402

AUGMENT_FIELDS = tuple(f.name for f in fields(utils.Augment))
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
    try:
        return name, kind(value)
    except ValueError:
        raise ValueError(f"--change {text!r}: {name} takes {kind.__name__} values, not {value!r}") from None


def notebook_runs(seeds, norms=("bn", "ln", "gn"), name="notebook", **changes):
    """Each norm's notebook recipe with `changes` (Recipe or Augment fields), with these seeds."""
    aug = {k: changes.pop(k) for k in AUGMENT_FIELDS if k in changes}
    runs = []
    for n in norms:
        base = utils.recipe_for(n)
        recipe = replace(base, augment=replace(base.augment, **aug), **changes)
        runs += [dict(name=name, norm=n, seed=s, groups=recipe.groups, notebook_build=recipe.build,
                      notebook_recipe=utils.recipe_dict(recipe)) for s in seeds]
    return runs


def run_one(spec, data_path, device, threads=1, smoke=False, progress=False):
    torch.set_num_threads(threads)
    data = utils.load_cifar10(data_path)
    utils.set_seed(spec["seed"])
    recipe = records.recipe_from_dict(spec["notebook_recipe"])
    model = recipe.make_model(spec["norm"]).to(device)
    subsets = {}
    if smoke:
        recipe, subsets = replace(recipe, epochs=1), dict(train_subset=512, test_subset=512)
    train, test = utils.make_loaders(data, recipe, device, seed=spec["seed"], **subsets)
    return dict(spec, data=data.source, **records.fit_record(model, train, test, recipe, progress=progress))


def worker(args):
    spec, data_path, threads, smoke, progress = args
    try:
        return run_one(spec, data_path, utils.pick_device(), threads, smoke, progress)
    except Exception as e:    # one broken config must not end the sweep
        return dict(spec, error=repr(e))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a local CIFAR-10 copy (folder or .tar.gz, see "
                   "utils.load_cifar10); "
                   "default: $S8_DATA, else torchvision's download into data/")
    p.add_argument("--out", required=True, help="JSON-lines file each run's record is appended to")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--norms", default="bn,ln,gn", help="comma-separated norms")
    p.add_argument("--notebook-seeds", default="1", help="comma-separated seeds")
    p.add_argument("--change", action="append", default=[], metavar="FIELD=VALUE",
                   help="a Recipe or Augment field changed, e.g. build=reference or lr=0.1 (repeatable)")
    p.add_argument("--name", default="notebook", help="the runs' trial name in the records")
    p.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    p.add_argument("--smoke", action="store_true", help="1 epoch on 512 training images per run")
    a = p.parse_args(argv)
    try:
        changes = dict(parse_change(c) for c in a.change)
        seeds = [int(s) for s in a.notebook_seeds.split(",")]
        specs = notebook_runs(seeds, a.norms.split(","), a.name, **changes)
    except ValueError as e:
        p.error(str(e))
    print(f"{len(specs)} runs on {a.workers} workers", flush=True)
    if a.dry_run:
        for s in specs:
            print(s["norm"], s["name"], s["seed"], s["notebook_build"], changes)
        return
    utils.load_cifar10(a.data)          # decode once; the workers read the cache
    with get_context("spawn").Pool(a.workers) as pool:
        threads = max(1, (os.cpu_count() or 1) // a.workers)
        progress = a.workers == 1       # several workers' epoch lines would interleave
        for r in pool.imap_unordered(worker, [(s, a.data, threads, a.smoke, progress) for s in specs]):
            records.append_jsonl(a.out, r)
            print(r["norm"], r["name"], r.get("seed"), r.get("final", r.get("error")), r.get("seconds"),
                  flush=True)


if __name__ == "__main__":
    main()

"""The report: fills the generated blocks of README.md from the results files, and draws its
figures. Every number the README shows comes from here.

    python benchmarks/report.py            # rewrite README.md's blocks and the figures
    python benchmarks/report.py --check    # only compare: exit 1 and name the first stale block

Blocks are marked in the Markdown as <!-- NAME:start --> ... <!-- NAME:end -->.
"""
import argparse
import itertools
import json
import math
import re
import os
import sys
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import records  # noqa: E402
import utils  # noqa: E402
from why_normalise import TRAINS_ABOVE  # noqa: E402
from model import NORMS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_NORMS = ("bn", "ln", "gn")
DOCS = ("README.md", "doc/tuning.md")     # the Markdown files that hold generated blocks
HAND_WRITTEN = {"test-command"}           # marked for .ci/run to read, not generated


def machine(record):
    """"GPU" or "CPU" for a run's or a notebook record's device."""
    device = record.get("device", "")
    return "GPU" if device.startswith(("NVIDIA", "cuda")) else "CPU" if device.startswith("CPU") else "?"


def spread(values):
    """'mean ± std' of several finals (sample std), or '-' for one."""
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}%" if len(values) > 1 else "-"


def same_runs(record, runs, name="notebook", **changes):
    """The finished sweep runs named `name` of a notebook record's norm, recipe (with `changes`) and kind
    of machine."""
    recipe = dict(record["recipe"], **changes)
    return [x for x in runs if x.get("name") == name and x["norm"] == record["norm"] and "final" in x
            and machine(x) == machine(record) and x.get("notebook_recipe") == recipe]


def seed_runs(record, runs):
    """{seed: final test accuracy} of a notebook record (seed 1) and the sweep runs of exactly its recipe
    on its kind of machine."""
    accs = {record["seed"]: record["history"][-1]["test_acc"]}
    for x in same_runs(record, runs):
        accs.setdefault(x["seed"], x["final"])
    return accs


def headline_table(notebooks, runs):
    """Per notebook: build, parameters, the epoch it first reached 70%, final test accuracy, the 3-seed mean;
    then the assignment's network trained with the same recipe (sweep runs named "reference")."""
    rows = ["| notebook | build | parameters | first epoch ≥ 70% | final test acc | mean ± std, seeds 1-3 | "
            "measured on |", "|---|---|---|---|---|---|---|"]
    for r in notebooks:
        s, accs = utils.summarize(r["history"]), seed_runs(r, runs)
        name = f"S8_{NORMS[r['norm']]}.ipynb"
        rows.append(f"| [{name}]({name}) | {r['build']} | {r['params']:,} | "
                    f"{s['first_epoch_70'] or 'never'} | **{s['final_test_acc']:.2f}%** | "
                    f"{spread([accs[k] for k in sorted(accs)])} | {r['device']} |")
    for r in notebooks:
        ref = same_runs(r, runs, name="reference", build="reference")
        for x in sorted(ref, key=lambda x: x["seed"])[:1]:
            s = utils.summarize(x["history"])
            finals = [y["final"] for y in ref]
            rows.append(f"| {NORMS[r['norm']]}, the assignment's network | reference | {x['params']:,} | "
                        f"{s['first_epoch_70'] or 'never'} | **{x['final']:.2f}%** | "
                        f"{spread(finals) if len(finals) > 1 else 'seed 1 only'} | {x['device']} |")
    return "\n".join(rows)


def candidates_table(candidates, runs):
    """The shared recipe's choice: each candidate's 3-seed mean per norm and over the three norms.
    candidates: {label: [notebook record per norm]}."""
    rows = ["| candidate recipe | " + " | ".join(NORMS[n] for n in NOTEBOOK_NORMS) + " | mean of the three |",
            "|---|" + "---|" * (len(NOTEBOOK_NORMS) + 1)]
    for label, recs in candidates.items():
        means = []
        cells = []
        for r in recs:
            accs = seed_runs(r, runs)
            means.append(np.mean(list(accs.values())))
            cells.append(f"{spread([accs[k] for k in sorted(accs)])} ({len(accs)} seeds)")
        rows.append(f"| {label} | " + " | ".join(cells) + f" | **{np.mean(means):.2f}%** |")
    return "\n".join(rows)


def reference_table(runs):
    """The assignment's network, seed 1, with each candidate's settings (whitened C1 or not)."""
    rows = ["| whitened C1 | " + " | ".join(NORMS[n] for n in NOTEBOOK_NORMS) + " |",
            "|---|" + "---|" * len(NOTEBOOK_NORMS)]
    for whiten in (True, False):
        cells = []
        for n in NOTEBOOK_NORMS:
            finals = [x["final"] for x in runs
                      if x.get("name") == "reference" and x["norm"] == n and x["seed"] == 1
                      and x["notebook_recipe"].get("whiten_c1", False) is whiten]
            cells.append(f"{finals[0]:.2f}%" if finals else "not run")
        rows.append(f"| {'yes' if whiten else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def why_table(runs):
    """The why-normalise study (benchmarks/why_normalise.py): a caption of what every run trained, then
    per arm its final test accuracy at each peak lr (mean ± std over the seeds), its best lr and the
    largest lr at which every seed trained; then the signal's scale from C1 to C9 at initialisation and
    trained at the best lr (means over the seeds)."""
    first = runs[0]
    seeds = sorted({r["seed"] for r in runs})
    tolerance = utils.lr_tolerance(runs)
    lrs = sorted({r["lr"] for r in runs})
    rows = [f"Measured on {first['device']}, data {first['data']}, build `{first['build']}`, the notebooks' "
            f"recipe without the weight average, {first['epochs']} epochs on {first['train_subset']:,} "
            f"training images, tested on {first['test_subset']:,}, seeds {', '.join(map(str, seeds))}. "
            f"Final test accuracy (%), "
            f"mean ± std over the seeds; 'trains up to': the largest lr at which every seed ended above "
            f"{TRAINS_ABOVE:g}% with finite losses:", "",
            "| arm | parameters | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | trains up to |",
            "|---|---|" + "---|" * (len(lrs) + 2)]
    for label, t in tolerance.items():
        cells = []
        for f in (t["finals"].get(lr, []) for lr in lrs):
            spread_of = f" ± {np.std(f, ddof=1):.1f}" if len(f) > 1 else ""
            cells.append(f"{np.mean(f):.1f}{spread_of}" if f else "-")
        best = f"{t['best']:g} ({t['best_acc']:.1f}%)"
        rows.append(f"| {label} | {t['params']:,} | " + " | ".join(cells) + f" | {best} | "
                    f"{t['largest_trained'] if t['largest_trained'] is not None else 'none'} |")
    rows += ["", f"The std of each 3x3 block's output on {first['probe_images']} random test images, "
             "C1 → C9, at initialisation and after training at the arm's best lr (means over the seeds):", "",
             "| arm | C1 → C9 at init | C1 → C9 trained |", "|---|---|---|"]
    for label, t in tolerance.items():
        std = {when: [float(np.mean([r[f"depth_{when}"]["act_std"][k] for r in t["at_best"]]))
                      for k in (0, -1)]
               for when in ("init", "trained")}
        rows.append(f"| {label} | {std['init'][0]:.2g} → {std['init'][1]:.2g} | "
                    f"{std['trained'][0]:.2g} → {std['trained'][1]:.2g} |")
    return "\n".join(rows)


def base_batch(run):
    """The batch a benchmarks/batch_size.py run scaled its lr from (the notebooks' batch when it ran).
    Runs from before the record carried it all scaled from 64, the notebooks' batch then."""
    return run.get("base_batch", 64)


def _batch_sweeps(runs):
    """benchmarks/batch_size.py records grouped by the sweep they belong to (everything but norm, batch and
    seed the same: epochs, training images, machine, data, the batch the lr scales from), in the order they
    first appear."""
    sweeps = {}
    for r in runs:
        key = (r["epochs"], r["train_subset"], machine(r), r["data"], base_batch(r))
        sweeps.setdefault(key, []).append(r)
    return list(sweeps.values())


def batch_size_means(sweep):
    """{(norm, batch): dict(final, train_final: means over the sweep's seeds of that cell, std: of the finals,
    seeds)} for one sweep of _batch_sweeps."""
    cells = {}
    for r in sweep:
        cells.setdefault((r["norm"], r["batch_size"]), []).append(r)
    return {key: dict(final=float(np.mean([r["final"] for r in rs])),
                      train_final=float(np.mean([r["train_final"] for r in rs])),
                      std=float(np.std([r["final"] for r in rs], ddof=1)) if len(rs) > 1 else None,
                      seeds=sorted(r["seed"] for r in rs))
            for key, rs in cells.items()}


def batch_size_table(runs):
    """One table per batch-size sweep (benchmarks/batch_size.py): a row per batch size, each norm's final
    test accuracy (the mean over the sweep's seeds, ± their standard deviation) and final train accuracy,
    led by a line that says what every run of it trained on."""
    blocks = []
    for sweep in _batch_sweeps(runs):
        first, means = sweep[0], batch_size_means(sweep)
        norms = [n for n in NORMS if any(r["norm"] == n for r in sweep)]
        seeds = sorted({r["seed"] for r in sweep})
        pooled = (f"seeds {', '.join(map(str, seeds))} (each cell the mean over them, ± their standard "
                  f"deviation)"
                  if len(seeds) > 1 else f"seed {seeds[0]}")
        rows = [f"Measured on {first['device']}, data `{first['data']}`, {pooled}, {first['epochs']} "
                f"epochs on {first['train_subset']:,} training images, the full test set; the notebooks' "
                f"build (`{first['build']}`) and recipe with lr scaled by batch / {base_batch(first)} and no "
                f"weight average. Final test accuracy "
                f"(final train accuracy):", "",
                "| batch | steps per epoch | peak lr | " + " | ".join(NORMS[n] for n in norms) + " |",
                "|---|---|---|" + "---|" * len(norms)]
        for batch in sorted({r["batch_size"] for r in sweep}):
            cells = []
            for n in norms:
                m = means.get((n, batch))
                if m is None:
                    cells.append("not run")
                    continue
                spread = f" ± {m['std']:.2f}" if m["std"] is not None else ""
                partial = f" (seed {', '.join(map(str, m['seeds']))} only)" if m["seeds"] != seeds else ""
                cells.append(f"**{m['final']:.2f}%**{spread} ({m['train_final']:.2f}%){partial}")
            lr = next(r["lr"] for r in sweep if r["batch_size"] == batch)
            rows.append(f"| {batch} | {math.ceil(first['train_subset'] / batch):,} | {lr:.4g} | "
                        + " | ".join(cells) + " |")
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks) if blocks else "No batch-size sweep has run yet (`benchmarks/batch_size.py`)."


def bn_test_time_table(record):
    """benchmarks/bn_test_time.py: one trained BatchNorm network's test accuracy in eval mode and in
    train mode on shuffled and on one-class test batches, a row per batch size."""
    rows = [f"Measured on {record['device']}, data {record['data']}, build `{record['build']}`, one "
            f"BatchNorm network trained {record['epochs']} epochs on {record['train_subset']:,} images (seed "
            f"{record['seed']}, no weight average), then tested on all 10,000 test images:", "",
            "| test batch | eval mode | train mode, shuffled batches | train mode, one class per batch |",
            "|---|---|---|---|"]
    for r in record["rows"]:
        rows.append(f"| {r['batch_size']} | {r['eval_mode']:.2f}% | {r['train_mode_shuffled']:.2f}% | "
                    f"{r['train_mode_one_class']:.2f}% |")
    return "\n".join(rows)


def speed_table(results):
    """benchmarks/speed.py results, one row per machine; records from before a column existed
    show "-" there (their build was the reference one)."""
    columns = ["pipeline: ours (utils.Loader)", "pipeline: conventional (PIL + DataLoader, 2 workers)",
               "compute floor (one batch, repeated)", "compute floor, NCHW layout", "our training epoch",
               "evaluation"]
    rows = ["| machine | build | ours: pipeline | conventional pipeline | compute floor | "
            "compute floor, NCHW | our training epoch | evaluation | s per epoch | overhead | "
            "pipeline speed-up | channels_last speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rate = {row["what"]: row["images_per_s"] for row in r["rows"]}
        rates = " | ".join(f"{rate[c]:,.0f}" if c in rate else "-" for c in columns)
        layout = f"**{r['channels_last_speedup']:.2f}x**" if "channels_last_speedup" in r else "-"
        rows.append(f"| {r['device']} (torch {r['torch']}) | {r.get('build', 'reference')} | {rates} | "
                    f"{r['epoch_seconds']} | **{r['overhead']:.2f}** | **{r['pipeline_speedup']:.1f}x** | "
                    f"{layout} |")
    return "\n".join(rows)


def _notebook_lines(path, prefix):
    """Output lines of an executed notebook that start with prefix (a string or a tuple of them)."""
    nb = json.loads(Path(path).read_text())
    return [line for cell in nb["cells"] if cell["cell_type"] == "code" for out in cell.get("outputs", [])
            if out.get("output_type") == "stream" for line in "".join(out["text"]).splitlines()
            if line.startswith(prefix)]


def plot_batch_sizes(runs, path=None):
    """The last batch-size sweep of _batch_sweeps (benchmarks/batch_size.py): final test accuracy (solid, with
    the seeds' standard deviation as error bars where there are several) and final train accuracy (dotted)
    against the batch size, means over the seeds, one colour per norm."""
    sweep = _batch_sweeps(runs)[-1]
    means = batch_size_means(sweep)
    batches = sorted({b for _, b in means})
    seeds = sorted({r["seed"] for r in sweep})
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for norm in NORMS:
        mine = [(b, means[norm, b]) for b in batches if (norm, b) in means]
        if not mine:
            continue
        xs = [b for b, _ in mine]
        line = ax.errorbar(xs, [m["final"] for _, m in mine], yerr=[m["std"] or 0 for _, m in mine], fmt="-o",
                           capsize=3, label=f"{NORMS[norm]} test")[0]
        ax.plot(xs, [m["train_final"] for _, m in mine], ":", color=line.get_color(),
                label=f"{NORMS[norm]} train")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, labels=batches)
    ax.set(xlabel="batch size (peak lr scaled by batch / 64)", ylabel="final accuracy (%)",
           title=f"Batch size: {sweep[0]['epochs']} epochs on {sweep[0]['train_subset']:,} images, "
                 + (f"mean of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    # each norm's test line beside its train line
    order = sorted(range(len(labels)), key=labels.__getitem__)
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
    fig.tight_layout()
    return utils.save_figure(fig, path)


def plot_comparison(histories, path=None):
    """Several runs' test accuracy and train loss on shared axes: histories = {label: history}."""
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in histories.items():
        epochs = [h["epoch"] for h in history]
        line, = ax_acc.plot(epochs, [h["test_acc"] for h in history], "-o", ms=3, label=f"{label} test")
        ax_acc.plot(epochs, [h["train_acc"] for h in history], ":", color=line.get_color(),
                    label=f"{label} train")
        ax_loss.plot(epochs, [h["test_loss"] for h in history], "-o", ms=3, color=line.get_color(),
                     label=f"{label} test")
    ax_loss.set(xlabel="epoch", ylabel="test loss", title="test loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy (solid: test, dotted: train)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return utils.save_figure(fig, path)




def plot_why_normalise(runs, path=None):
    """benchmarks/why_normalise.py's runs, three panels: final test accuracy against the peak lr (mean
    over the seeds, their range shaded); then, at each arm's best lr, each 3x3 block's output std and
    its conv weights' gradient norm, dashed at initialisation and solid trained (means over seeds)."""
    first = runs[0]
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    for k, (label, t) in enumerate(utils.lr_tolerance(runs).items()):
        lrs, finals = list(t["finals"]), list(t["finals"].values())
        axes[0].plot(lrs, [np.mean(f) for f in finals], "-o", ms=3, color=f"C{k}", label=label)
        axes[0].fill_between(lrs, [min(f) for f in finals], [max(f) for f in finals], color=f"C{k}",
                             alpha=0.2)
        for ax, key in zip(axes[1:], ("act_std", "grad_norm")):
            for when, style, words in (("depth_init", "--", "at init"),
                                       ("depth_trained", "-o", f"trained at lr {t['best']:g}")):
                y = np.mean([r[when][key] for r in t["at_best"]], axis=0)
                ax.plot(first["depth_init"]["blocks"], y, style, ms=3, color=f"C{k}",
                        label=f"{label}, {words}")
    axes[0].axhline(10, color="grey", lw=0.8, ls=":", label="chance (10%)")
    grid = sorted({r["lr"] for r in runs})
    axes[0].set_xscale("log")
    axes[0].set_xticks(grid, labels=[f"{lr:g}" for lr in grid])
    axes[0].minorticks_off()
    axes[0].set(xlabel="peak learning rate (log scale)", ylabel="final test accuracy (%)",
                title=f"{first['epochs']} epochs on {first['train_subset']:,} images, "
                      f"shaded: the seeds' range")
    axes[1].set(ylabel="std of the block's output", title="scale of the signal through depth")
    axes[2].set(ylabel="gradient norm of the block's conv weights", title="gradient through depth")
    for ax in axes[1:]:
        ax.set(yscale="log", xlabel="block (input side to output side)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return utils.save_figure(fig, path)


def plot_norm_methods(path=None):
    """Which values of an (N, C, H, W) activation share one mean and variance, as in Wu & He 2018's
    figure 2 but flat: a row per sample, a column per channel, each cell all H x W positions of that
    sample and channel; blue, one set of shared statistics, and pale colours the others."""
    import matplotlib.pyplot as plt
    n, c, groups = 4, 8, 4
    sets = {                         # which set of statistics the cell (sample i, channel j) belongs to
        "BatchNorm\nper channel, over (N, H, W)": lambda i, j: j,
        "LayerNorm\nper sample, over (C, H, W)": lambda i, j: i,
        "InstanceNorm (GroupNorm, G = C)\nper sample and channel, over (H, W)": lambda i, j: i * c + j,
        f"GroupNorm, G = {groups}\nper sample and group, over (C/G, H, W)":
            lambda i, j: i * groups + j // (c // groups),
    }
    pale = [plt.cm.Pastel1(k) for k in (0, 2, 3, 4, 5, 6, 7)]          # Pastel1 without its blue
    fig, axes = plt.subplots(1, len(sets), figsize=(15, 3.6))
    for ax, (name, member) in zip(axes, sets.items()):
        which = np.array([[member(i, j) for j in range(c)] for i in range(n)])
        # set 0 in blue; the others in seven pale colours, so that neighbouring sets differ (seven
        # does not divide the eight channels, so one set per cell shows as a diagonal pattern)
        colours = np.array([pale[k % len(pale)] for k in which.flat]).reshape(n, c, -1)
        colours[which == 0] = (0.12, 0.39, 0.75, 1.0)
        ax.imshow(colours)
        ax.set_xticks(np.arange(-0.5, c), minor=True)
        ax.set_yticks(np.arange(-0.5, n), minor=True)
        ax.grid(which="minor", color="white", lw=2)
        ax.tick_params(which="both", length=0)
        ax.set(xticks=[], yticks=[], xlabel="C (channels)", ylabel="N (samples)")
        ax.set_title(name, fontsize=10)
    fig.suptitle("Blue: the values that share one mean and variance (each cell: all H x W positions of one "
                 "sample's channel); each pale colour: another such set", fontsize=10)
    fig.tight_layout()
    return utils.save_figure(fig, path)


def comparable(recipe):
    """A recipe record without the removed switches that were off (records.REMOVED_SWITCH_OFF) and the
    added fields at the value older records trained with (records.ADDED_FIELD_DEFAULT), flat, so
    that records of older code and of the present one compare equal when they trained the same way."""
    flat = {**{k: v for k, v in recipe.items() if k != "augment"}, **recipe.get("augment", {})}
    return {k: v for k, v in flat.items() if v not in records.REMOVED_SWITCH_OFF.get(k, ())
            and (k not in records.ADDED_FIELD_DEFAULT or v != records.ADDED_FIELD_DEFAULT[k])}


def tuned_table(tuned, shared, runs):
    """What tuning each norm on its own added: the per-norm tuned notebook recipes (their 3 seeds) next to
    the shared recipe (its 3 seeds)."""
    rows = ["| norm | tuned for that norm alone | measured on | the shared recipe | measured on |",
            "|---|---|---|---|---|"]
    for t, s in zip(tuned, shared):
        a, b = seed_runs(t, runs), seed_runs(s, runs)
        rows.append(f"| {NORMS[t['norm']]} | {spread(list(a.values()))} ({len(a)} seeds, {t['build']}) | "
                    f"{machine(t)} | {spread(list(b.values()))} ({len(b)} seeds, {s['build']}) | "
                    f"{machine(s)} |")
    return "\n".join(rows)


def replace_block(text, name, body):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"the text lacks the {start} ... {end} markers around its {name} block")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def blocks_of(text):
    """{name: body} of every generated block in a Markdown text."""
    found = re.findall(r"<!-- ([\w-]+):start -->\n(.*?)\n?<!-- \1:end -->", text, flags=re.S)
    return {name: body for name, body in found if name not in HAND_WRITTEN}


def load_all(root=ROOT):
    results = Path(root) / "doc" / "results"
    load = lambda folder: [records.load_results(folder / f"{n}.json") for n in NOTEBOOK_NORMS]  # noqa: E731
    runs = [r for p in sorted(results.glob("*.jsonl")) for r in records.read_jsonl(p)]
    for r in runs:
        if isinstance(r.get("notebook_recipe"), dict):
            r["notebook_recipe"] = comparable(r["notebook_recipe"])
    notebooks, candidate_a, tuned = (load(results), load(results / "earlier" / "9-candidate-separable-skips"),
                                     load(results / "earlier" / "10-tuned-per-norm"))
    for r in notebooks + candidate_a + tuned:
        r["recipe"] = comparable(r["recipe"])
    return dict(runs=runs, notebooks=notebooks, candidate_a=candidate_a, tuned=tuned,
                why=records.read_jsonl(results / "why-normalise-lr.jsonl"),
                batch=records.read_jsonl(results / "batch-size.jsonl"),
                bn_test_time=json.loads((results / "bn-test-time.json").read_text()),
                speed=[json.loads(p.read_text()) for p in sorted(results.glob("speed-*.json"))])


# The two candidate recipes the shared one was chosen from (doc/tuning.md): they differ in two things,
# weight standardization and C1's whitened start, so their gap is the two together.
CANDIDATE_NOTEBOOKS = "separable-ws-skips: weight standardization, C1 from PyTorch's init (the notebooks')"
CANDIDATE_A = "separable-skips: no weight standardization, C1 started as a whitening of image patches"


def generate(root=ROOT, d=None):
    """{name: body} of every block the report writes, from the results files alone (`d`: load_all's)."""
    d = d or load_all(root)
    stats = "\n".join(_notebook_lines(Path(root) / "S8_BatchNorm.ipynb", ("mean:", "std: ")))
    if not stats:
        raise ValueError("S8_BatchNorm.ipynb printed no mean and std: execute it before writing the report")
    return {
        "headline": headline_table(d["notebooks"], d["runs"]),
        "candidates": candidates_table({CANDIDATE_NOTEBOOKS: d["notebooks"], CANDIDATE_A: d["candidate_a"]},
                                       d["runs"]),
        "reference": reference_table(d["runs"]),
        "why": why_table(d["why"]),
        "batch-size": batch_size_table(d["batch"]),
        "bn-test-time": bn_test_time_table(d["bn_test_time"]),
        "speed": speed_table(d["speed"]),
        "stats": f"```\n{stats}\n```",
        "tuned": tuned_table(d["tuned"], d["notebooks"], d["runs"]),
    }


def draw(root=ROOT, d=None):
    d = d or load_all(root)
    doc = Path(root) / "doc"
    plot_comparison({NORMS[r["norm"]]: r["history"] for r in d["notebooks"]}, path=doc / "comparison.png")
    plot_batch_sizes(d["batch"], path=doc / "batch_size.png")
    plot_why_normalise(d["why"], path=doc / "why_normalise.png")
    plot_norm_methods(path=doc / "norm_methods.png")


def stale_blocks(root=ROOT):
    """(file, block, first differing line) for each generated block that differs from what the report
    writes now; a block the report writes that no file holds is stale too."""
    wanted, found, stale = generate(root), set(), []
    for doc in DOCS:
        text = (Path(root) / doc).read_text()
        for name, body in blocks_of(text).items():
            found.add(name)
            if name not in wanted:
                stale.append((doc, name, "no generator writes this block"))
            elif body != wanted[name]:
                ours, theirs = body.splitlines(), wanted[name].splitlines()
                diff = next(((a, b) for a, b in itertools.zip_longest(ours, theirs, fillvalue="") if a != b),
                            ("", "(the same lines, other blank lines)"))
                stale.append((doc, name, f"has {diff[0]!r}, the report writes {diff[1]!r}"))
    stale += [("-", name, "no document holds it") for name in wanted if name not in found]
    return stale


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare only; exit 1 naming the first stale block")
    a = p.parse_args(argv)
    if a.check:
        stale = stale_blocks()
        for doc, name, why in stale:
            print(f"{doc}: block {name!r} {why}")
        sys.exit(1 if stale else 0)
    d = load_all()
    blocks = generate(d=d)
    for doc in DOCS:
        path = ROOT / doc
        text = path.read_text()
        for name in blocks_of(text):
            text = replace_block(text, name, blocks[name])
        utils.atomic_write(path, lambda f: f.write(text))
    draw(d=d)


if __name__ == "__main__":
    main()

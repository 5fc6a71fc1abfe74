"""Writes the three notebooks, S8_BatchNorm/LayerNorm/GroupNorm.ipynb, from one story: the same
cells in the same order, with only the norm's own text and code between them. Outputs are left
empty; execute the notebooks afterwards (README, "How to run").

    python benchmarks/notebooks.py --force     # erases the executed outputs: execute them again after
    python benchmarks/notebooks.py --sources   # text changes only: the executed outputs stay
    python benchmarks/notebooks.py --rerun     # and execute the cells marked in RERUN again, alone
"""
import argparse
import os
import sys

import nbformat

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
from model import NORMS  # noqa: E402

REPO_URL = "https://github.com/ORG/S8-normalization.git"

SETUP = '''# Setup: the same cell in every notebook; in Colab it fetches the repository, locally it does nothing.
import importlib.util, os, subprocess, sys
REPO_URL = "%s"   # the repository these notebooks live in
if "google.colab" in sys.modules and not os.path.exists("model.py"):
    if not os.path.exists("s8-normalization"):
        if subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "s8-normalization"]).returncode:
            raise RuntimeError(f"could not clone {REPO_URL}: set REPO_URL in this cell to the address of the "
                               "repository this notebook came from, or upload model.py and utils.py beside it")
    %%cd s8-normalization
missing = [pkg for pkg in ("torchsummary", "tqdm") if importlib.util.find_spec(pkg) is None]
if missing:  # torch and torchvision are never reinstalled: Colab's own are used
    %%pip install -q {" ".join(missing)}''' % REPO_URL


# Cells executed again on their own after the notebooks' last full run (main(--rerun)): the markdown
# before each says so. Empty it when the notebooks are next executed whole.
RERUN = {"data": "records now name the data set by what it is, not by a machine's path",
         "recipe": "the recipe lost the switches no run used and gained its init",
         "figure": "the figure was redrawn", "by_hand_bn": "the check now covers eval mode too",
         "why": "the study it reads was redone"}
RERUN_MARK = "Executed again on its own"
# The code cells a re-executed cell needs first: the setup, the imports, the data and the loaders.
RERUN_NEEDS = ("# Setup:", "import dataclasses", "data = utils.load_cifar10()", "train_loader, test_loader =")


def rerun_note(key):
    """The sentence that tells a reader the outputs of the code cells below a markdown cell are not the
    full run's ("" if they are)."""
    if key not in RERUN:
        return ""
    return (f"\n\n*{RERUN_MARK}, the code below this text: on 2026-12-07, in a fresh kernel on a CPU after "
            f"the setup, data and loader cells, because {RERUN[key]}. Every other output in this notebook "
            f"is the GPU run's.*")


# What the why-normalise study shows (doc/results/why-normalise-lr.jsonl; the README says the same).
WHY_TEXT = """What the runs show, in this short budget (3 epochs on 10,000 images, two seeds; the README has the table):

- **The init decides whether a plain network trains.** With PyTorch's default init every block shrinks the signal, the gradient that reaches the first blocks is tiny, and no run leaves chance (10%). With He init the signal keeps its scale through depth and the same network trains.
- **A norm widens the range of learning rates that work.** The plain network with He init stays at chance from a peak lr of 0.162 on; BatchNorm and GroupNorm train at every lr up to 0.8, LayerNorm up to 0.36. Each norm divides a block's output by its own spread, so a larger step cannot blow the scale up block after block.
- **BatchNorm also learns fastest here**, well above the plain network at every lr; GroupNorm's best is a few points above the plain network's, LayerNorm's level with it.

Weight standardization, which this notebook's build uses, is itself a normaliser of the weights: without a norm beside it, it makes every conv multiply the signal's spread by about the square root of its fan-in, and that network never leaves chance (the README links that record)."""


def by_hand(comment, statistics):
    """A norm's by-hand check: the same probe of C2's feature map, then that norm's statistics."""
    return f"# NBVAL_CHECK_OUTPUT\n{comment}\n{PROBE}{statistics}"


PROBE = """probe = recipe.make_model(NORM).to(device).train()
x, _ = next(iter(test_loader))
with torch.no_grad():
    feat = probe.layers.C2.conv(probe.layers.C1(x))          # (N, 32, 32, 32)
    layer = probe.layers.C2.norm
"""

NORM_TEXT = {
    "bn": dict(axes=r"""## Normalisation: BatchNorm

**Axes.** For an activation of shape (N, C, H, W), BatchNorm computes one mean $\mu_c$ and one variance $\sigma_c^2$ **per channel**, over the batch and all positions: axes **(N, H, W)**.

$$y_{n,c,h,w} = \gamma_c\,\frac{x_{n,c,h,w}-\mu_c}{\sqrt{\sigma_c^2+\epsilon}} + \beta_c$$

**Learnable parameters:** a scale $\gamma_c$ and a shift $\beta_c$ per channel, $2C$ per layer. It also keeps two *buffers* that are not learned: a running mean and a running variance.

**Train vs test.** In training it normalises with the statistics of the current batch and updates the running averages (momentum 0.1). In `eval()` mode it uses the running averages, so a test image's output does not depend on the other images in its batch. The two modes differ, which is why `model.eval()` matters: the README's "BatchNorm at test time" measures what a trained network scores when it is tested in train mode, on shuffled batches and on batches of one class.

**Batch size 1.** In training, the statistics of one image's H×W positions are noisy and the batch no longer regularises; with a 1×1 map PyTorch refuses (one value per channel has no variance). At test time batch size 1 is fine: the running averages are used.

The figure shows which values share one mean and variance for each norm, InstanceNorm (GroupNorm with G = C) beside them.""",
               by_hand=by_hand("# BatchNorm by hand on a real feature map: mean and variance over (N, H, W), per channel.", """    mean = feat.mean(dim=(0, 2, 3), keepdim=True)             # (1, 32, 1, 1)
    var = feat.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
    by_hand = (feat - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    print("feature map", tuple(feat.shape), "-> statistics", tuple(mean.shape))
    print("matches nn.BatchNorm2d in train mode:", torch.allclose(by_hand, layer(feat), atol=1e-4))
    # that call moved the running averages a tenth of the way to this batch's statistics; eval() uses them
    running = (feat - layer.running_mean.view(1, -1, 1, 1)) / torch.sqrt(layer.running_var.view(1, -1, 1, 1) + layer.eps)
    by_hand = running * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    print("matches it in eval mode, on the running averages:", torch.allclose(by_hand, layer.eval()(feat), atol=1e-4))""")),
    "ln": dict(axes=r"""## Normalisation: LayerNorm

**Axes.** For an activation of shape (N, C, H, W), LayerNorm computes one mean $\mu_n$ and one variance $\sigma_n^2$ **per sample**, over all channels and positions: axes **(C, H, W)**.

$$y_{n,c,h,w} = \gamma_c\,\frac{x_{n,c,h,w}-\mu_n}{\sqrt{\sigma_n^2+\epsilon}} + \beta_c$$

**Learnable parameters:** a scale $\gamma_c$ and a shift $\beta_c$ per channel, $2C$ per layer. `model.LayerNorm2d` is `nn.GroupNorm(1, C)`: exactly this normalisation, with the same parameter count as BatchNorm and valid at any image size. (`nn.LayerNorm([C, H, W])` would learn $2CHW$ values, one per element, and accept only one input size.)

**Train vs test.** No running statistics: every sample is normalised by its own mean and variance, identically in `train()` and `eval()` mode.

**Batch size 1.** Works the same at any batch size, 1 included, because no statistic crosses samples.

The figure shows which values share one mean and variance for each norm, InstanceNorm (GroupNorm with G = C) beside them.""",
               by_hand=by_hand("# LayerNorm by hand on a real feature map: mean and variance over (C, H, W), per sample.", """    mean = feat.mean(dim=(1, 2, 3), keepdim=True)             # (N, 1, 1, 1)
    var = feat.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
    by_hand = (feat - mean) / torch.sqrt(var + layer.eps) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    print("feature map", tuple(feat.shape), "-> statistics", tuple(mean.shape))
    print("matches", type(layer).__name__, "in train and eval mode:",
          torch.allclose(by_hand, layer(feat), atol=1e-4), torch.allclose(by_hand, layer.eval()(feat), atol=1e-4))""")),
    "gn": dict(axes=r"""## Normalisation: GroupNorm

**Axes.** For an activation of shape (N, C, H, W), GroupNorm splits the C channels into G groups of C/G and computes one mean $\mu_{n,g}$ and variance $\sigma_{n,g}^2$ **per sample and group**: axes **(C/G, H, W)**.

$$y_{n,c,h,w} = \gamma_c\,\frac{x_{n,c,h,w}-\mu_{n,g(c)}}{\sqrt{\sigma_{n,g(c)}^2+\epsilon}} + \beta_c$$

**Learnable parameters:** a scale $\gamma_c$ and a shift $\beta_c$ per channel, $2C$ per layer, as for BatchNorm. G = 1 gives LayerNorm, G = C gives InstanceNorm; this network uses `recipe.groups` groups, which must divide every layer's width (`Net` raises a `ValueError` listing the counts that do). Here G = 8, so each group pools 2 to 14 channels; 8 groups beat 4 and 16 in the trials ([doc/tuning.md](doc/tuning.md)).

**Train vs test.** No running statistics: identical in `train()` and `eval()` mode.

**Batch size 1.** Works the same at any batch size, because no statistic crosses samples.

The figure shows which values share one mean and variance for each norm, InstanceNorm (GroupNorm with G = C) beside them.""",
               by_hand=by_hand("# GroupNorm by hand on a real feature map: mean and variance over (C/G, H, W), per sample and group.", """    groups = feat.reshape(len(feat), layer.num_groups, -1)    # (N, G, 32/G * 32 * 32)
    mean = groups.mean(dim=-1, keepdim=True)                  # (N, G, 1)
    var = groups.var(dim=-1, keepdim=True, unbiased=False)
    by_hand = ((groups - mean) / torch.sqrt(var + layer.eps)).reshape(feat.shape) * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)
    print("feature map", tuple(feat.shape), "->", layer.num_groups, "groups, statistics", tuple(mean.shape))
    print("matches nn.GroupNorm in train and eval mode:",
          torch.allclose(by_hand, layer(feat), atol=1e-4), torch.allclose(by_hand, layer.eval()(feat), atol=1e-4))""")),
}


def cells(norm):
    name = NORMS[norm]
    text = NORM_TEXT[norm]
    md, code = nbformat.v4.new_markdown_cell, nbformat.v4.new_code_cell
    return [
        md(f"""# CIFAR-10 under 50k parameters: {name}

One of three notebooks: [BatchNorm](S8_BatchNorm.ipynb), [LayerNorm](S8_LayerNorm.ipynb), [GroupNorm](S8_GroupNorm.ipynb). The assignment: a CNN in the layout `C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10`, **under 50,000 parameters**, at least **70% test accuracy within 20 epochs**, once with each norm. All three notebooks train the same network with the same recipe; only the norm differs, so their results compare the norms. The code lives in [`model.py`](model.py) and [`utils.py`](utils.py); this notebook tells the story and calls them.

Run it top to bottom (*Runtime → Run all* in Colab, on a GPU). The first cell fetches the repository when the notebook runs alone in Colab and installs what is missing; locally it does nothing."""),
        code(SETUP),
        code(f"""import dataclasses, json
from pathlib import Path
import matplotlib.pyplot as plt
import torch
from IPython.display import Image, display
from torchsummary import summary
import utils
from model import count_parameters
from utils import format_receptive_field, receptive_field

NORM = "{norm}"
SEED = 1
# Quick mode for CI: S8_EPOCHS / S8_SUBSET cut the run down; the defaults are the full run.
EPOCHS = int(os.environ.get("S8_EPOCHS", 20))
SUBSET = int(os.environ["S8_SUBSET"]) if os.environ.get("S8_SUBSET") else None
QUICK = EPOCHS != 20 or SUBSET is not None
DOC = utils.figure_dir(QUICK)          # doc/, or a scratch folder in quick mode: quick runs never touch doc/
recipe = dataclasses.replace(utils.recipe_for(NORM), epochs=EPOCHS)
device = utils.pick_device()
print("device:", utils.device_name(device), "| epochs:", EPOCHS, "| train subset:", SUBSET or "all")"""),
        md("""## Data

`utils.load_cifar10()` returns the whole data set as uint8 tensors. By default it is torchvision's download (what Colab gets); `S8_DATA` points it at a local copy instead, a folder or a `.tar.gz` (this repository's own runs use a JPEG copy of CIFAR-10, see the README). Decoded images are cached in `data/cache`. `data.source` says what the data is: a file's name and kind, never a machine's path.""" + rerun_note("data")),
        code("""data = utils.load_cifar10()
print("source:", data.source)"""),
        code("""# NBVAL_CHECK_OUTPUT
print("train:", tuple(data.train_images.shape), data.train_images.dtype, "labels", tuple(data.train_labels.shape))
print("test: ", tuple(data.test_images.shape), data.test_images.dtype, "labels", tuple(data.test_labels.shape))
print("classes:", ", ".join(data.classes))
print("images per class (train):", torch.bincount(data.train_labels).tolist())"""),
        md("""**Mean and standard deviation** per channel, over every pixel of the 50,000 training images. An average of per-batch standard deviations would be biased; `utils.channel_mean_std` counts each channel's 256 possible values and computes both moments exactly from that histogram."""),
        code("""mean, std = utils.channel_mean_std(data.train_images)
print("mean:", tuple(round(m, 4) for m in mean))
print("std: ", tuple(round(s, 4) for s in std))"""),
        md("""Three random training images of every class, one class per column:"""),
        code("""sample = utils.class_sample(data.train_labels, per_class=3, seed=SEED)
utils.show_images(data.train_images[sample], data.train_labels[sample], data.classes, nrows=3, ncols=10,
                  path=DOC / "dataset_images.png")
plt.show()"""),
        md("""### Augmentation

Augmentation runs on whole batches of tensors inside `utils.Loader` (no PIL, no per-image loop): a horizontal flip with probability 0.5 and, for 10% of the images, a rotation by up to ±10°. The rows show each operation on its own, then what the recipe applies. Random crops are implemented too; with this small network they cost accuracy in 20 epochs ([doc/tuning.md](doc/tuning.md))."""),
        code("""print(recipe.augment)
one_each = utils.class_sample(data.train_labels, per_class=1, seed=SEED)
utils.show_augmentations(data.train_images[one_each], recipe.augment, mean, std, path=DOC / "augmentations.png")
plt.show()"""),
        md("""## Model

`model.Net` builds the layout `C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10`: 3x3 blocks (conv → norm → ReLU → dropout) expand the channels, 1x1 blocks (c3, c6) squeeze them before each max-pool, global average pooling and a 1x1 conv classify.

The assignment's network, `build="reference"`, has 46,064 parameters, all in full convolutions. This notebook trains **`recipe.build`** instead, the same layout with three changes that cost no parameters beyond the budget. From C3 on, every 3x3 block is *depthwise-separable*: a 3x3 filter per input channel, then a 1x1 convolution that mixes the channels. That costs 9·C_in + C_in·C_out weights instead of 9·C_in·C_out, so the budget buys two to three times the width at 16x16 and 8x8, where this small network is short of capacity. Blocks that keep their input's shape (c3, C4, C5) add it back, `x + block(x)`, which gives the gradient a short path. And every conv that mixes channels uses *weight standardization* (`model.StdConv2d`, the "ws" in the name): it uses each filter at zero mean and unit variance, whatever its raw weights are. That is a normaliser too, of the weights rather than the activations, and it works alongside the norm this notebook is about. The README compares both networks with the same recipe.

The summary runs on a fresh model before anything is seeded, because torchsummary's own forward pass would move BatchNorm's running statistics and the random generator."""),
        code("""# NBVAL_CHECK_OUTPUT
print("build:", recipe.build, "| norm:", NORM, "| parameters:", count_parameters(recipe.make_model(NORM)))
summary(recipe.make_model(NORM).to(device), (3, 32, 32), device=device.type)"""),
        md("""The **receptive field** is computed from the model's own modules (kernel, stride, padding of each layer). "jump" is the distance in input pixels between neighbouring outputs."""),
        code("""# NBVAL_CHECK_OUTPUT
print(format_receptive_field(receptive_field(recipe.make_model(NORM))))"""),
        md("""### Recipe

The same for all three notebooks, one object: `utils.recipe_for(NORM)`.

- **SGD** with Nesterov momentum 0.9 and weight decay 5e-4, **batch 64**. The norms' own scale and shift get no weight decay (`decay_norms=False`): on a conv followed by a norm, decay only changes the step size, but on the norm's scale it would pull each channel's voice toward zero.
- **One-cycle learning rate**, stepped every batch: up to the peak (0.05) over the first quarter of the steps, then down to almost zero.
- **Regularisation:** weight decay, Dropout(0.02) after every block, the augmentation above. The network is small and fits the training set only a little better than the test set, so stronger regularisation cost accuracy in the trials.
- **A moving average of the weights** (`ema=0.999`) is what the last epoch tests: it smooths out the noise of the last steps. The last point of the curves below is that average.""" + rerun_note("recipe")),
        code("print(recipe)"),
        md(text["axes"] + rerun_note("figure")),
        code("""display(Image("doc/norm_methods.png"))   # drawn by benchmarks/report.py"""),
        md("""**The same thing by hand.** Take a real feature map (C2's convolution output for a test batch) and compute the normalisation with plain tensor ops: mean and variance over the axes above, then the layer's scale and shift. It must match the layer's own output.""" + (rerun_note("by_hand_bn") if norm == "bn" else "")),
        code("""train_loader, test_loader = utils.make_loaders(data, recipe, device, seed=SEED, train_subset=SUBSET)
print(len(train_loader), "train batches,", len(test_loader), "test batches of", recipe.batch_size)"""),
        code(text["by_hand"]),
        md("""### Why normalise at all?

The assignment's network, trained briefly without any norm and with each of the three, at eight peak learning rates from 0.003 to 0.8, two seeds each, by `benchmarks/why_normalise.py`; its results file, `doc/results/why-normalise-lr.jsonl`, is read here, not recomputed (the runs take an hour on a CPU). Without a norm each conv has a bias where the norm's shift was, and two inits are tried: PyTorch's default and He's (`model.init_weights`). Left: test accuracy against the peak lr. Middle and right, at each arm's best lr: the standard deviation of each 3x3 block's output on a fixed batch of test images, and the norm of the loss's gradient with respect to each block's conv weights, dashed at initialisation and solid after training.""" + rerun_note("why")),
        code("""why = [json.loads(line) for line in Path("doc/results/why-normalise-lr.jsonl").read_text().splitlines()]
display(Image("doc/why_normalise.png"))   # drawn from these runs by benchmarks/report.py
for arm, t in utils.lr_tolerance(why).items():
    print(f"{arm:>22}: best peak lr {t['best']:g} ({t['best_acc']:.1f}% after {why[0]['epochs']} epochs), "
          f"every seed trains up to lr {t['largest_trained']}")"""),
        md(WHY_TEXT),
        md("""### The peak learning rate: a range test

Leslie Smith's **learning-rate range test**: a fresh copy of this notebook's network trains for a few hundred batches while the learning rate grows geometrically. The loss falls slowly while the lr is too small, fastest over the useful range, and climbs once it is too large. A one-cycle peak (dashed) belongs between the steepest fall (▼) and the lowest point (●). The test has its own network and loader, so the training below is the same with or without it. Across the three notebooks the range tests rank the norms as the sweep above does: BatchNorm's lowest point at the largest lr, then GroupNorm's, then LayerNorm's."""),
        code("""lr_test = utils.lr_range_record(data, NORM, recipe, device, seed=SEED, train_subset=SUBSET,
                                steps=30 if QUICK else 400)
print(f"steepest fall at lr {lr_test['lr_steepest']:.3g}, lowest loss at lr {lr_test['lr_at_min']:.3g}, "
      f"the recipe's peak lr {recipe.lr:g}")
utils.plot_lr_range([lr_test], path=DOC / f"{NORM}_lr_range.png")
plt.show()"""),
        md(f"""## Training

{"Up to 20"} epochs with the recipe above; one progress bar over the epochs and one line per epoch. The train accuracy on each line is the running figure over the epoch's augmented batches, with dropout on. `utils.fit` returns the history."""),
        code("""utils.set_seed(SEED)
net = recipe.make_model(NORM).to(device)
history = utils.fit(net, train_loader, test_loader, recipe)"""),
        code("""record = utils.save_results(DOC / "results" / f"{NORM}.json", norm=NORM, params=count_parameters(net),
                            device=utils.device_name(device), data=data.source, seed=SEED, history=history,
                            build=recipe.build, recipe=utils.recipe_dict(recipe))
summary_numbers = utils.summarize(history)
summary_numbers"""),
        code(f"""utils.plot_history(history, title="{name}", averaged_last=recipe.ema > 0, path=DOC / f"{{NORM}}_curves.png")
plt.show()"""),
        md("""### Misclassified test images

Ten test images that the final model gets wrong, one from each true class in turn, captioned with its prediction and the truth."""),
        code(f"""index, predicted, true = utils.misclassified(net, test_loader, n=10)
utils.plot_misclassified(data.test_images[index], predicted, true, data.classes,
                         path=DOC / f"{{NORM}}_misclassified.png", title="{name}: predicted / true")
plt.show()"""),
        md("""## Findings

Read off this run. Train accuracy is measured here the way test accuracy is: the final model, `eval()` mode, no augmentation, so the gap between the two says how much better the network fits the images it trained on."""),
        code(f"""s = summary_numbers
_, train_acc = utils.evaluate(net, utils.unaugmented(train_loader))
print(f"{name}: {{s['final_test_acc']:.2f}}% test accuracy after {{s['epochs']}} epochs "
      f"(best {{s['best_test_acc']:.2f}}%), with {{count_parameters(net):,}} parameters.")
print(f"It first reached 70% in epoch {{s['first_epoch_70']}}." if s["first_epoch_70"] else "It did not reach 70%.")
print(f"Train accuracy of the final model {{train_acc:.2f}}%, {{train_acc - s['final_test_acc']:+.2f}} points from its test accuracy.")"""),
        md("""How the three norms compare, over three seeds each, and what the assignment's own network reaches with the same recipe: the README's results, built from the three notebooks' `doc/results/*.json` and the seed runs."""),
    ]


def write_sources(path, new_cells):
    """Put the generated sources into an executed notebook, keeping every cell's outputs: for text
    changes that do not call for executing the trained notebooks again."""
    nb = nbformat.read(path, as_version=4)
    if [c.cell_type for c in nb.cells] != [c.cell_type for c in new_cells]:
        raise SystemExit(f"{path}: the generator's cells differ in number or kind from the notebook's; "
                         "write it with --force and execute it again")
    for old, new in zip(nb.cells, new_cells):
        old.source = new.source
    nbformat.write(nb, path)


def rerun_marked_cells(path, timeout=1200):
    """Execute, in a fresh kernel, the cells RERUN_NEEDS names and the code cells below each markdown
    cell that carries RERUN_MARK (up to the next markdown cell); only the latter's outputs replace
    the saved ones (their execution counts stay the full run's)."""
    import copy
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    marked, below_mark = [], False
    for i, c in enumerate(nb.cells):
        if c.cell_type == "markdown":
            below_mark = RERUN_MARK in c.source
        elif below_mark:
            marked.append(i)
    needs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.source.startswith(RERUN_NEEDS)]
    scratch = copy.deepcopy(nb)
    client = NotebookClient(scratch, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": ROOT}})
    with client.setup_kernel():
        for i in sorted(set(needs) | set(marked)):
            client.execute_cell(scratch.cells[i], i)
    for i in marked:
        for out in scratch.cells[i].outputs:
            if "execution_count" in out:                  # an execute_result: numbered as the cell
                out.execution_count = nb.cells[i].execution_count
        nb.cells[i].outputs = scratch.cells[i].outputs
    nbformat.write(nb, path)
    return marked


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--force", action="store_true", help="overwrite notebooks that hold outputs (an executed run)")
    p.add_argument("--sources", action="store_true",
                   help="write the cells' sources into the executed notebooks, keeping their outputs")
    p.add_argument("--rerun", action="store_true", help="then execute the cells marked as executed again "
                   "(RERUN) on their own and keep their new outputs (needs the data: S8_DATA)")
    a = p.parse_args(argv)
    paths = {norm: os.path.join(ROOT, f"S8_{NORMS[norm]}.ipynb") for norm in ("bn", "ln", "gn")}
    if a.sources or a.rerun:
        for norm, path in paths.items():
            write_sources(path, cells(norm))
            if a.rerun:
                print(path, "cells executed again:", rerun_marked_cells(path))
        return
    executed = [path for path in paths.values() if os.path.exists(path) and any(
        c.get("outputs") for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")]
    if executed and not a.force:
        p.error(f"{', '.join(map(os.path.basename, executed))} hold an executed run's outputs, which writing would "
                "erase: pass --force, then execute the notebooks again")
    for norm, path in paths.items():
        nb = nbformat.v4.new_notebook(cells=cells(norm))
        nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                       "language_info": {"name": "python"}, "accelerator": "GPU",
                       "colab": {"provenance": []}}
        nbformat.write(nb, path)
        print("wrote", path)


if __name__ == "__main__":
    main()

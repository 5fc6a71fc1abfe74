"""Data, training, evaluation, plots and results files for the S8 notebooks.

Sections: data (load_cifar10, channel_mean_std, Augment, Loader), training
(Recipe, set_seed, pick_device, train_epoch, evaluate, fit), results files,
plots. Every notebook calls these; nothing here is notebook-specific.
"""
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import random
import tarfile
import tempfile
import textwrap
import time
import urllib.error
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from model import NORM_LAYERS, NORMS, Net, count_parameters

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
# The course's accuracy targets (final-epoch, single-view test accuracy, %, 20 epochs, < 50k
# parameters): what the README's targets table measures each notebook run against.
TARGETS = {"bn": 85.0, "ln": 81.0, "gn": 82.0}
MAX_EPOCHS = 20               # the course's epoch limit; longer runs are diagnostics, labelled so in tables
DATA_ENV = "S8_DATA"          # points load_cifar10 at a local copy
HOW_TO_PROVIDE = (
    f"Provide CIFAR-10 in one of these ways: let torchvision download it (needs internet), or set "
    f"{DATA_ENV} (or pass source=) to (1) a folder holding torchvision's 'cifar-10-batches-py', "
    f"(2) an ImageFolder folder with train/<class>/*.jpg and test/<class>/*.jpg, or (3) a .tar or "
    f".tar.gz of that ImageFolder layout.")


# ----------------------------------------------------------------------------- data

@dataclass
class CIFAR10:
    """The whole data set as uint8 tensors: images (N, 3, 32, 32), labels (N,) int64."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple
    source: str     # where it came from, for reports

    def __repr__(self):
        return (f"CIFAR10(train={tuple(self.train_images.shape)}, test={tuple(self.test_images.shape)}, "
                f"dtype={self.train_images.dtype}, classes={len(self.classes)}, source={self.source!r})")


def load_cifar10(source=None, data_dir="data"):
    """Load CIFAR-10 as uint8 tensors, decoding at most once.

    source: None -> $S8_DATA if set, else torchvision's download into `data_dir`;
            a folder (torchvision's pickles, or ImageFolder layout); or a .tar/.tar.gz
            of the ImageFolder layout. Decoded tensors are cached under `data_dir/cache`,
            so a second load only reads one file; nothing is written beside `source`.
    """
    source = source if source is not None else os.environ.get(DATA_ENV) or None
    data_dir = Path(data_dir)
    if source is None:
        folder = _download(data_dir)
        label = "torchvision download (original CIFAR-10)"
    else:
        folder = Path(source).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"CIFAR-10 source {str(folder)!r} does not exist. {HOW_TO_PROVIDE}")
        label = str(folder)
    cache = data_dir / "cache" / f"cifar10-{_fingerprint(folder)}.pt"
    if cache.exists():
        try:
            saved = torch.load(cache, weights_only=True)
            return CIFAR10(**saved, source=label)
        except Exception:       # a stale or broken cache is rebuilt, never trusted
            cache.unlink()
    splits, classes = _read_source(folder)
    saved = dict(train_images=splits["train"][0], train_labels=splits["train"][1],
                 test_images=splits["test"][0], test_labels=splits["test"][1], classes=tuple(classes))
    _atomic_write(cache, lambda f: torch.save(saved, f), binary=True)
    return CIFAR10(**saved, source=label)


def _download(data_dir):
    import torchvision
    try:
        for train in (True, False):
            torchvision.datasets.CIFAR10(data_dir, train=train, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise RuntimeError(f"Could not download CIFAR-10 into {str(data_dir)!r} ({e}). "
                           f"{HOW_TO_PROVIDE}") from e
    return data_dir / "cifar-10-batches-py"


def _fingerprint(path):
    """Identifies a source by its location, size and modification time (cheap: no hashing of data)."""
    path = path.resolve()
    parts = [str(path)] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                           for p in ([path] if path.is_file() else sorted(path.iterdir()))]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _read_source(path):
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise RuntimeError(f"{str(path)!r} is not a readable .tar/.tar.gz archive (corrupt or "
                               f"truncated?). Fetch it again. {HOW_TO_PROVIDE}")
        return _read_image_tar(path)
    pickles = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    if (pickles / "batches.meta").exists():
        return _read_pickles(pickles)
    if (path / "train").is_dir() and (path / "test").is_dir():
        files = ((p.relative_to(path).parts, p.read_bytes) for p in sorted(path.glob("*/*/*")) if p.is_file())
        return _decode_image_files(files, str(path))
    raise RuntimeError(f"{str(path)!r} holds neither 'cifar-10-batches-py' nor train/ and test/ "
                       f"folders. {HOW_TO_PROVIDE}")


def _read_pickles(folder):
    """torchvision's on-disk format: data_batch_1..5 and test_batch, each a pickled dict."""
    def read(name):
        try:
            with open(folder / name, "rb") as f:
                return pickle.load(f, encoding="latin1")
        except FileNotFoundError:
            raise RuntimeError(f"{str(folder)!r} lacks {name}: the CIFAR-10 copy is incomplete. "
                               f"{HOW_TO_PROVIDE}") from None
        except (pickle.UnpicklingError, EOFError) as e:
            raise RuntimeError(f"{str(folder / name)!r} is corrupt ({e}). {HOW_TO_PROVIDE}") from None

    classes = read("batches.meta")["label_names"]
    _check_classes(classes, str(folder))
    splits = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        batches = [read(n) for n in names]
        data = np.concatenate([b["data"] for b in batches])
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise RuntimeError(f"{str(folder)!r}: {split} images have {data.shape[1:]} values each, "
                               f"expected 3072 (3x32x32). Is this CIFAR-10?")
        images = torch.from_numpy(data).reshape(-1, *IMAGE_SHAPE).contiguous()
        labels = torch.tensor([y for b in batches for y in b["labels"]], dtype=torch.int64)
        splits[split] = (images, labels)
    return splits, classes


def _read_image_tar(path):
    try:
        with tarfile.open(path) as tar:
            # Members are read in archive order, one pass, without extracting to disk.
            files = ((Path(m.name).parts, lambda m=m: tar.extractfile(m).read())
                     for m in tar if m.isfile())
            return _decode_image_files(files, str(path))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise RuntimeError(f"{str(path)!r} is corrupt or truncated ({type(e).__name__}: {e}). "
                           f"Fetch it again. {HOW_TO_PROVIDE}") from e


def _decode_image_files(files, where):
    """files: (path parts, read-bytes callable) pairs; keeps those under <split>/<class>/<file>."""
    found = {"train": [], "test": []}
    for parts, read in files:
        if len(parts) >= 3 and parts[-3] in found and not parts[-1].startswith("."):
            found[parts[-3]].append((parts[-2], "/".join(parts[-3:]), read()))
    splits = {}
    for split, items in found.items():
        classes = sorted({c for c, _, _ in items})
        missing = [c for c in CLASSES if c not in classes]
        if missing:
            raise RuntimeError(f"{where}: {split}/ has no folder for class(es) {missing}. An ImageFolder "
                               f"copy of CIFAR-10 needs {split}/<class>/ for all of {list(CLASSES)}.")
        _check_classes(classes, f"{where}/{split}")
        images = torch.empty(len(items), *IMAGE_SHAPE, dtype=torch.uint8)
        labels = torch.empty(len(items), dtype=torch.int64)
        items.sort(key=lambda item: item[1])          # the same order on every machine
        for i, (cls, name, data) in enumerate(tqdm(items, desc=f"decoding {split}", mininterval=5, ascii=True)):
            try:
                img = decode_rgb(data)
            except (OSError, ValueError) as e:      # PIL's UnidentifiedImageError is an OSError
                raise RuntimeError(f"{where}: cannot decode {name} ({e}). Replace the file or fetch the "
                                   f"copy again. {HOW_TO_PROVIDE}") from None
            if tuple(img.shape) != IMAGE_SHAPE:
                raise RuntimeError(f"{where}: {name} is {img.shape[2]}x{img.shape[1]} pixels; CIFAR-10 "
                                   f"images are 32x32. Point {DATA_ENV} at an unresized copy.")
            images[i], labels[i] = img, CLASSES.index(cls)
        splits[split] = (images, labels)
    return splits, list(CLASSES)


def decode_rgb(data):
    """One image file's bytes (JPEG, PNG, ...) as uint8 RGB pixels, shape (3, H, W). Pillow decodes
    (torchvision's own decoders are deprecated since 0.29); on the JPEG copy its pixels are exactly
    torchvision's, all 60,000 images compared."""
    with Image.open(io.BytesIO(data)) as img:
        pixels = np.array(img.convert("RGB"))                 # (H, W, 3); grey or RGBA files too
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _check_classes(classes, where):
    if list(classes) != list(CLASSES):
        raise RuntimeError(f"{where}: classes {list(classes)} are not CIFAR-10's {list(CLASSES)}.")


def subset(images, labels, n, seed=0):
    """A class-balanced-in-expectation random subset of n images (for quick runs and tests)."""
    if n is None or n >= len(images):
        return images, labels
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return images[idx], labels[idx]


def channel_mean_std(images):
    """Exact per-channel mean and (population) std of uint8 images (N, C, H, W), scaled to [0, 1].

    Counts every pixel value with a histogram per channel, so the result is the statistic over
    all pixels of the split, not an average of per-batch statistics, and needs no float copy."""
    if images.dtype != torch.uint8:
        raise TypeError(f"channel_mean_std expects uint8 images, got {images.dtype}")
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        n = counts.sum()
        mean = (counts * values).sum() / n
        means.append(mean.item())
        stds.append(((counts * (values - mean) ** 2).sum() / n).sqrt().item())
    return tuple(means), tuple(stds)


@dataclass
class Augment:
    """Batched augmentation on normalised float tensors; each part can be switched off.

    flip: probability of a horizontal flip; crop_pad: random crop after padding by this many
    pixels (an integer shift in [-pad, pad], zero fill); rotate_deg/rotate_p: rotate by an angle
    uniform in [-deg, deg] with probability p; flip_alternate: each image's flip is drawn once
    (probability flip) and then inverted every epoch, so any two epochs in a row show every image
    both ways (Loader keeps the per-image draw; as in Jordan's cifar10-airbench); cutout: side of a
    square, centred anywhere in the image and clipped at its borders, set to the mean colour (DeVries
    and Taylor 2017), applied last; 0: none."""
    flip: float = 0.5
    crop_pad: int = 4
    rotate_deg: float = 0.0
    rotate_p: float = 0.0
    flip_alternate: bool = False
    cutout: int = 0

    def draw(self, n, generator):
        """The random choices for n images, drawn on the CPU so that a seed gives the same
        augmentation on every device."""
        g = generator
        flip = torch.rand(n, generator=g) < self.flip
        shift = torch.randint(-self.crop_pad, self.crop_pad + 1, (n, 2), generator=g)
        angle = (torch.rand(n, generator=g) * 2 - 1) * self.rotate_deg
        angle = torch.where(torch.rand(n, generator=g) < self.rotate_p, angle, torch.zeros(n))
        # drawn only when used, so that runs without cutout keep the random stream of older records
        centre = (torch.randint(0, IMAGE_SHAPE[1], (n, 2), generator=g) if self.cutout > 0
                  else torch.zeros(n, 2, dtype=torch.int64))
        return flip, shift, angle, centre

    def apply(self, x, flip, shift, angle, centre):
        if self.flip > 0:
            x = hflip(x, flip)
        if self.rotate_deg > 0 and self.rotate_p > 0:
            x = rotate(x, angle)
        if self.crop_pad > 0:
            x = translate(x, shift, self.crop_pad)
        if self.cutout > 0:
            x = cutout(x, centre, self.cutout)
        return x


def hflip(x, mask):
    """Mirror the images where mask (N,) is True."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def translate(x, shift, pad):
    """Random crop with padding as one gather: image i is moved by shift[i] = (dy, dx) pixels,
    |d| <= pad, with zeros filling the border."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (pad - shift[:, 0, None] + torch.arange(h, device=x.device))       # (N, H)
    cols = (pad - shift[:, 1, None] + torch.arange(w, device=x.device))       # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]   # (N, H, W, C)
    out = out.permute(0, 3, 1, 2)                          # (N, C, H, W), channels_last in memory
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def cutout(x, centre, size):
    """Set a size x size square of image i, centred at centre[i] = (row, col) and clipped at the
    borders, to 0: the mean colour of normalised images. One mask for the batch, no loop."""
    top_left = centre - size // 2                                                # (N, 2)
    rows = torch.arange(x.shape[2], device=x.device) - top_left[:, :1]           # (N, H)
    cols = torch.arange(x.shape[3], device=x.device) - top_left[:, 1:]           # (N, W)
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    return torch.where(inside[:, None], 0.0, x)        # (N, C, H, W); keeps x's memory format


def rotate(x, degrees):
    """Rotate image i by degrees[i] about its centre (bilinear, zero fill), all in one call."""
    theta = torch.deg2rad(degrees.to(x.dtype))
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Loader:
    """Batches from one normalised float tensor that lives on `device`.

    Conversion to float and normalisation happen once, here. Each epoch then shuffles with a
    seeded generator and augments batch by batch with a few tensor ops: no PIL, no workers,
    no per-image Python loop. len() is the number of batches (391 for 50,000 at 128)."""

    def __init__(self, images, labels, mean, std, batch_size=128, shuffle=False, augment=None,
                 seed=0, device="cpu", channels_last=False):
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"Loader expects uint8 images shaped (N, 3, 32, 32), got "
                             f"{images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        device = torch.device(device)
        mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        x = images.to(device).float().div_(255).sub_(mean).div_(std)
        self.images = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        self.labels = labels.to(device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        self.epoch = 0              # passes started so far
        self.first_flips = None     # per image, for Augment.flip_alternate: the first epoch's flips

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n, bs = len(self.labels), self.batch_size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        if self.augment is not None:
            choices = list(self.augment.draw(n, self.generator))
            if self.augment.flip_alternate:
                # the first epoch's draw, read as one flip per image, then inverted on odd epochs
                if self.first_flips is None:
                    self.first_flips = choices[0]
                flips = self.first_flips ^ (self.epoch % 2 == 1)
                choices[0] = flips if order is None else flips[order]    # in the order of the batches
            choices = [t.to(self.device, non_blocking=True) for t in choices]
        if order is not None:
            order = order.to(self.device, non_blocking=True)
        self.epoch += 1
        for start in range(0, n, bs):
            idx = slice(start, start + bs) if order is None else order[start:start + bs]
            x, y = self.images[idx], self.labels[idx]
            if self.augment is not None:
                x = self.augment.apply(x, *(t[start:start + bs] for t in choices))
            yield x, y


# ----------------------------------------------------------------------------- training

@dataclass
class Recipe:
    """Everything about how a network is trained, in one place. The defaults are the recipe
    the notebooks train with, chosen by the trials in doc/trials.md; `recipe_for(norm)` adds the
    departures of single norms (NORM_RECIPES)."""
    build: str = "separable"      # model.BUILDS name
    groups: int = 8               # GroupNorm groups, chosen by measurement (doc/trials.md); bn/ln ignore it
    dropout: float = None         # None: the build's own (0.02 for the reference build)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05              # peak learning rate of the one-cycle schedule
    momentum: float = 0.9         # the middle of the one-cycle momentum range below
    momentum_swing: float = 0.05  # one-cycle moves momentum against the lr, between momentum +- swing:
                                  # 0.95 at the start, 0.85 at the peak lr, back to 0.95; 0 holds it still
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norms: bool = True      # weight decay on the norms' scale and shift too; False spares them
    decay_depthwise: bool = True  # weight decay on the depthwise 3x3 filters of separable blocks too;
                                  # False spares them (MobileNet's advice: they hold 9 weights each)
    train_norm_scale: bool = True # False holds every norm's scale at 1, untrained, as cifar10-airbench's
                                  # BatchNorm does; the shift still trains
    sam_rho: float = 0.0          # > 0: every step is SAM's (sharpness-aware, train_step) with this radius;
                                  # twice the compute per step, the same 20 passes over the data
    label_smoothing: float = 0.0
    warmup: float = 0.25          # fraction of steps spent rising to the peak
    anneal: str = "linear"        # the one-cycle's curve up and down: "linear", or "cos" (OneCycleLR's
                                  # default: longer near the peak and near the end, quicker in between)
    whiten_c1: bool = False       # start C1's filters from the training patches' whitening (whiten_init)
    ema: float = 0.0              # per-step decay of a moving average of the weights (and BatchNorm's
                                  # statistics) that the model takes before the last test; 0: none
    precise_bn: bool = False      # before the last test, BatchNorm's running statistics become a plain
                                  # average over one pass of the training data (torch's update_bn)
                                  # instead of the moving average of the last few batches
    augment: Augment = field(default_factory=lambda: Augment(flip=0.5, crop_pad=0,
                                                             rotate_deg=10, rotate_p=0.1))

    def make_model(self, norm):
        extra = {} if self.dropout is None else {"dropout": self.dropout}
        # channels_last weights, like make_loaders' images: faster on CPU and GPU, same numbers
        net = Net(norm, groups=self.groups, build=self.build, **extra).to(memory_format=torch.channels_last)
        if not self.train_norm_scale:
            for m in net.modules():
                if isinstance(m, NORM_LAYERS):
                    m.weight.requires_grad_(False)    # stays at its initial 1; the optimizer leaves it out
        return net


# Where one norm's notebook departs from Recipe(), measured in the tuning rounds (doc/tuning.md):
# weight standardization lifted LayerNorm and did nothing for BatchNorm and GroupNorm; sparing the
# norms' scale and shift from weight decay lifted GroupNorm and BatchNorm (LayerNorm: one trial, doc/tuning.md);
# then three changes that each ended within the seed spread alone, stacked, lifted five of the six BatchNorm and
# GroupNorm seeds over the run of the same seed without them; on LayerNorm's own weight-standardized build
# the skips and the average (not the whitened C1, which weight standardization undoes) lifted all three of
# its seeds over every seed of its recipe before them (doc/tuning.md). Last, momentum held still instead of
# swung against the lr lifted each of BatchNorm's and GroupNorm's three seeds over its recipe's run of the same
# seed (doc/tuning.md); LayerNorm's seeds 2 and 3 with it ended below its recipe's, so LayerNorm keeps the swing.
STACKED_CHANGES = dict(build="separable-skips", whiten_c1=True, ema=0.999)
NORM_RECIPES = {"bn": dict(decay_norms=False, momentum_swing=0.0, **STACKED_CHANGES),
                "ln": dict(build="separable-ws-skips", ema=STACKED_CHANGES["ema"]),
                "gn": dict(decay_norms=False, momentum_swing=0.0, **STACKED_CHANGES)}


def recipe_for(norm):
    """The recipe a norm's notebook trains: Recipe() with that norm's NORM_RECIPES entry."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(map(repr, NORMS))}")
    return replace(Recipe(), **NORM_RECIPES.get(norm, {}))


# Recipe (and Augment) fields added after runs were recorded, with the value that reproduces the training of
# those older records (a new field's default keeps the old behaviour).
ADDED_FIELDS = {"decay_norms": True, "momentum_swing": 0.05, "whiten_c1": False,
                "precise_bn": False, "flip_alternate": False, "decay_depthwise": True, "ema": 0.0, "cutout": 0,
                "train_norm_scale": True, "sam_rho": 0.0, "anneal": "linear"}


def set_seed(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device():
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({torch.get_num_threads()} threads)"
    return device.type


def is_depthwise(module):
    """Whether module is a depthwise conv: one filter per input channel (a separable block's 3x3)."""
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def make_sgd(model, recipe, lr):
    """The recipe's SGD (Nesterov momentum, weight decay) at a constant lr. With recipe.decay_norms
    False the norms' affine scale and shift train without weight decay, with recipe.decay_depthwise
    False the depthwise convs' filters."""
    params = [p for p in model.parameters() if p.requires_grad]
    spared = {id(p) for m in model.modules()
              if (not recipe.decay_norms and isinstance(m, NORM_LAYERS))
              or (not recipe.decay_depthwise and is_depthwise(m))
              for p in m.parameters(recurse=False)}
    if spared:
        params = [dict(params=[p for p in params if id(p) not in spared]),
                  dict(params=[p for p in params if id(p) in spared], weight_decay=0.0)]
    return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)


def make_optimizer(model, recipe, steps_per_epoch):
    """make_sgd with a one-cycle learning rate stepped per batch, peaking at recipe.lr; momentum
    moves against the lr within recipe.momentum +- recipe.momentum_swing (0: constant)."""
    opt = make_sgd(model, recipe, recipe.lr)
    # One step more than the batches, so that the step after the last batch stays inside the
    # schedule (OneCycleLR extrapolates past its end) and the reported final lr is the minimum.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch + 1,
        pct_start=recipe.warmup, anneal_strategy=recipe.anneal, div_factor=10, final_div_factor=100,
        cycle_momentum=recipe.momentum_swing > 0,
        # rounded so that 0.9 -+ 0.05 are exactly the 0.85 and 0.95 every recorded run trained with
        base_momentum=round(recipe.momentum - recipe.momentum_swing, 10),
        max_momentum=round(recipe.momentum + recipe.momentum_swing, 10))
    return opt, sched


def first_conv(model):
    """The first nn.Conv2d of model (C1's conv in Net)."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@torch.no_grad()
def whiten_init(conv, images, n=2000, eps=5e-4):
    """Start a conv's filters as a whitening of its input patches (Jordan's cifar10-airbench): for the
    leading eigenvectors e_i of the covariance of the k x k patches of n of `images` (normalised, N,3,H,W),
    filter pairs +e_i/sqrt(lambda_i) and -e_i/sqrt(lambda_i), so that the layer starts out passing the
    images' strongest patterns, decorrelated and at equal scale, and the ReLU after it keeps both
    signs. Filters beyond 2 x the 3*k*k patch dimensions keep their random init."""
    if conv.groups != 1 or conv.in_channels != images.shape[1]:
        raise ValueError(f"whiten_init needs a full conv over the {images.shape[1]} image channels, "
                         f"got {conv}")
    # n images evenly spread over the set: a data set stored class by class (the JPEG copy) would
    # give its first n images from one class
    sample = images[torch.linspace(0, len(images) - 1, min(n, len(images))).long()]
    patches = F.unfold(sample.float(), conv.kernel_size)           # (n, 3*k*k, positions)
    patches = patches.transpose(1, 2).flatten(0, 1)                # (n*positions, 3*k*k)
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))   # ascending
    m = min(conv.out_channels // 2, len(eigenvalues))
    filters = eigenvectors[:, -m:].flip(1) / (eigenvalues[-m:].flip(0) + eps).sqrt()  # (3*k*k, m)
    filters = torch.cat([filters, -filters], 1).T                  # (2m, 3*k*k)
    conv.weight[:2 * m] = filters.reshape(2 * m, *conv.weight.shape[1:]).to(conv.weight)


def computes_bf16(device):
    """Whether training on `device` runs in bf16 autocast: on a CUDA GPU that has bf16 arithmetic (compute
    capability 8.0 on: A100, L4, H100). Older GPUs such as the T4 of Colab's free tier only emulate bf16, and
    cuDNN has no bf16 convolutions for them, so they stay in fp32 like the CPU."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def _autocast(device):
    """bf16 autocast where computes_bf16 (norms and the loss stay in fp32); plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=computes_bf16(device))


def batch_loss(model, x, y, label_smoothing=0.0):
    """(loss, log-probabilities) of model on the batch (x, y); the loss is not yet detached."""
    with _autocast(x.device):
        log_probs = model(x)
    loss = F.nll_loss(log_probs.float(), y) if label_smoothing == 0 else \
        F.cross_entropy(log_probs.float(), y, label_smoothing=label_smoothing)
    return loss, log_probs


@contextmanager
def batchnorm_stats_held(model):
    """BatchNorm layers still normalise by the batch but leave their running statistics as they are
    (momentum 0), for a second forward pass over a batch they have already counted."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def train_step(model, x, y, optimizer, label_smoothing=0.0, sam_rho=0.0):
    """One optimizer step on the batch (x, y); returns (loss, log-probabilities), loss not yet detached.
    With sam_rho > 0 the step is SAM's (Foret et al. 2021): the gradient is taken again at the weights
    moved rho along the normalised gradient, the weights are moved back, and the optimizer steps
    with that second gradient; it costs a second forward and backward pass."""
    loss, log_probs = batch_loss(model, x, y, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sam_rho > 0:
        params = [p for p in model.parameters() if p.grad is not None]
        start = [p.detach().clone() for p in params]
        with torch.no_grad():
            scale = sam_rho / (torch.nn.utils.get_total_norm([p.grad for p in params]) + 1e-12)
            for p in params:
                p.add_(p.grad * scale)                         # uphill, to the worst nearby point
        optimizer.zero_grad(set_to_none=True)
        with batchnorm_stats_held(model):
            batch_loss(model, x, y, label_smoothing)[0].backward()
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)                                    # back to where the step starts, exactly
    optimizer.step()
    return loss, log_probs


def train_epoch(model, loader, optimizer, scheduler=None, label_smoothing=0.0, averaged=None, sam_rho=0.0):
    """One pass over loader; returns (mean loss, accuracy %). Sums stay on the device: one sync.
    `averaged` (torch's AveragedModel of model), if given, is updated after every step."""
    model.train()
    device = loader.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in loader:
        loss, log_probs = train_step(model, x, y, optimizer, label_smoothing, sam_rho)
        if scheduler is not None:
            scheduler.step()
        if averaged is not None:
            averaged.update_parameters(model)
        loss_sum += loss.detach() * len(y)
        correct += (log_probs.argmax(1) == y).sum()
    n = len(loader.labels)
    return loss_sum.item() / n, 100.0 * correct.item() / n


@torch.inference_mode()
def predict(model, loader):
    """(log-probabilities, labels) for every image of loader, in the order the loader yields them."""
    model.eval()
    outputs, labels = [], []
    with _autocast(loader.device):
        for x, y in loader:
            outputs.append(model(x).float())
            labels.append(y)
    return torch.cat(outputs), torch.cat(labels)


def evaluate(model, loader):
    """(mean NLL loss, accuracy %) on loader, without gradients."""
    log_probs, y = predict(model, loader)
    loss = F.nll_loss(log_probs, y, reduction="sum").item() / len(y)
    return loss, 100.0 * (log_probs.argmax(1) == y).sum().item() / len(y)


def fit(model, train_loader, test_loader, recipe, progress=True):
    """Train for recipe.epochs with one tqdm bar over the epochs and one line per epoch.

    Returns the history: a list of dicts with epoch, train/test loss and accuracy (%), the
    learning rate at the end of the epoch, and the seconds the epoch took (training + test).
    With recipe.whiten_c1 the model's first conv is first set by whiten_init from the train images;
    with recipe.ema the model takes the moving average of its weights and BatchNorm statistics before the
    last test; with recipe.precise_bn BatchNorm's statistics are then recomputed over train_loader."""
    if recipe.whiten_c1:
        whiten_init(first_conv(model), train_loader.images)
    optimizer, scheduler = make_optimizer(model, recipe, len(train_loader))
    averaged = None
    if recipe.ema:
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(recipe.ema), use_buffers=True)
        averaged.update_parameters(model)   # the average starts at the initial weights, not the first step's
    history = []
    bar = tqdm(range(1, recipe.epochs + 1), desc="epochs", unit="epoch", disable=not progress,
               mininterval=0, ascii=True, dynamic_ncols=False, ncols=100)
    for epoch in bar:
        start = time.perf_counter()
        train_loss, train_acc = train_epoch(model, train_loader, optimizer, scheduler,
                                            recipe.label_smoothing, averaged, recipe.sam_rho)
        if averaged is not None and epoch == recipe.epochs:
            model.load_state_dict(averaged.module.state_dict())
        if recipe.precise_bn and epoch == recipe.epochs:
            torch.optim.swa_utils.update_bn(train_loader, model)
        test_loss, test_acc = evaluate(model, test_loader)
        row = dict(epoch=epoch, train_loss=round(train_loss, 4), train_acc=round(train_acc, 2),
                   test_loss=round(test_loss, 4), test_acc=round(test_acc, 2),
                   lr=round(scheduler.get_last_lr()[0], 6),
                   seconds=round(time.perf_counter() - start, 1))
        history.append(row)
        bar.set_postfix(test_acc=row["test_acc"])
        if progress:
            tqdm.write(f"epoch {epoch:2d}  train loss {train_loss:.3f} acc {train_acc:5.2f}%  "
                       f"test loss {test_loss:.3f} acc {test_acc:5.2f}%  lr {row['lr']:.4f}  "
                       f"{row['seconds']:.1f}s")
    return history


def fit_record(model, train_loader, test_loader, recipe, progress=False):
    """`fit`, timed, returned as the fields every benchmark record of a training run holds: the model's
    parameters, its final and best test accuracy, its final train accuracy, the seconds and device it
    took, and the history (benchmarks/sweep.py and batch_size.py add what they varied)."""
    start = time.time()
    history = fit(model, train_loader, test_loader, recipe, progress=progress)
    return dict(params=count_parameters(model), final=history[-1]["test_acc"],
                best=max(h["test_acc"] for h in history), train_final=history[-1]["train_acc"],
                seconds=round(time.time() - start, 1), device=device_name(next(model.parameters()).device),
                history=history)


def lr_range_test(model, loader, recipe, lr_min=1e-3, lr_max=10.0, steps=400, stop_factor=4.0,
                  smoothing=0.98, progress=True):
    """Leslie Smith's learning-rate range test: train model (its weights change: pass a fresh one)
    with the recipe's SGD for up to `steps` batches of loader, the lr growing geometrically from
    lr_min to lr_max (torch's ExponentialLR), and record each step's training loss. It stops once
    the smoothed loss exceeds stop_factor x its minimum: the lr has grown past what the net can take.

    Returns dict(lr, loss, smoothed) per step, and two readings of the curve: lr_at_min, where the
    smoothed loss is lowest, and lr_steepest, where it falls fastest per decade of lr. A one-cycle
    peak is usually chosen between the two: high enough to move fast, short of the lowest point."""
    if not 0 < lr_min < lr_max:
        raise ValueError(f"need 0 < lr_min < lr_max, got lr_min={lr_min}, lr_max={lr_max}")
    if steps < 3:
        raise ValueError(f"steps={steps}: the test needs at least 3 steps to read a slope")
    optimizer = make_sgd(model, recipe, lr_min)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=(lr_max / lr_min) ** (1 / (steps - 1)))
    model.train()
    lrs, losses, smoothed = [], [], []
    average, lowest = 0.0, math.inf
    batches = (batch for _ in itertools.count() for batch in loader)   # the loader's epochs, one after another
    bar = tqdm(total=steps, desc="lr range test", unit="step", disable=not progress,
               ascii=True, dynamic_ncols=False, ncols=100)
    for step, (x, y) in zip(range(steps), batches):
        lrs.append(scheduler.get_last_lr()[0])
        loss, _ = train_step(model, x, y, optimizer, recipe.label_smoothing)
        scheduler.step()
        losses.append(loss.item())
        # an exponential moving average, debiased for its zero start (as fastai's finder does)
        average = smoothing * average + (1 - smoothing) * losses[-1]
        smoothed.append(average / (1 - smoothing ** (step + 1)))
        bar.update()
        bar.set_postfix(lr=f"{lrs[-1]:.3g}", loss=f"{smoothed[-1]:.3f}", refresh=False)   # redrawn at the bar's own pace
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > stop_factor * lowest:
            break
        lowest = min(lowest, smoothed[-1])
    bar.close()
    lr_at_min, lr_steepest = read_lr_range(lrs, smoothed, span=round(1 / (1 - smoothing)))
    return dict(lr=lrs, loss=losses, smoothed=smoothed, lr_at_min=lr_at_min, lr_steepest=lr_steepest,
                stopped_early=len(lrs) < steps)


def read_lr_range(lrs, smoothed, span):
    """(lr of the lowest smoothed loss, lr of its steepest fall per unit of log10(lr) before that).
    The first `span` steps, which a moving average of that span has not yet settled over, are left out
    of the slope (at most half the steps before the minimum)."""
    finite = np.nan_to_num(np.array(smoothed, dtype=float), nan=np.inf)
    at_min = int(np.argmin(finite))
    skip = min(span, at_min // 2)
    if at_min - skip < 2:                   # too few points to read a slope from
        return lrs[at_min], lrs[skip]
    slope = np.gradient(finite[skip:at_min + 1], np.log10(lrs[skip:at_min + 1]))
    return lrs[at_min], lrs[skip + int(np.argmin(slope))]


def lr_range_record(data, norm, recipe, device, seed=1, steps=400, lr_min=1e-3, lr_max=10.0,
                    train_subset=None, progress=True):
    """lr_range_test of a fresh network of `recipe` and `norm`, seeded with `seed`, on its own train
    loader (a notebook's loaders and torch's random state are left as they were, so its training run
    is the same with or without this test). A recipe with whiten_c1 starts from the whitened C1, as
    fit does. Returns the test's result with what it ran: the record
    that benchmarks/lr_range.py writes and plot_lr_range / lr_range_table read."""
    train_loader, _ = make_loaders(data, recipe, device, seed=seed, train_subset=train_subset, test_subset=1)
    start = time.perf_counter()
    # the init and dropout draw from torch's generators (CPU, and CUDA where that is the device)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        net = recipe.make_model(norm).to(device)
        if recipe.whiten_c1:      # the network starts as fit starts it
            whiten_init(first_conv(net), train_loader.images)
        result = lr_range_test(net, train_loader, recipe, lr_min=lr_min, lr_max=lr_max, steps=steps,
                               progress=progress)
    return dict(norm=norm, build=recipe.build, params=count_parameters(net),
                recipe_lr=recipe.lr, batch_size=recipe.batch_size, lr_min=lr_min, lr_max=lr_max, steps=steps,
                seed=seed, device=device_name(device), data=data.source,
                seconds=round(time.perf_counter() - start, 1), **result)


def make_loaders(data, recipe, device, seed=1, train_subset=None, test_subset=None,
                 channels_last=True, test_batch_size=None):
    """Train and test loaders as every notebook and script uses them. Mean and std come from
    the (possibly subset) training images; only the train loader shuffles and augments. The test
    loader takes recipe.batch_size unless `test_batch_size` names another (evaluation gives the same
    numbers at any batch size: BatchNorm tests with its running statistics)."""
    train_x, train_y = subset(data.train_images, data.train_labels, train_subset, seed)
    test_x, test_y = subset(data.test_images, data.test_labels, test_subset, seed)
    mean, std = channel_mean_std(train_x)
    common = dict(mean=mean, std=std, batch_size=recipe.batch_size, device=device,
                  channels_last=channels_last)
    train = Loader(train_x, train_y, shuffle=True, augment=recipe.augment, seed=seed, **common)
    test = Loader(test_x, test_y, **dict(common, batch_size=test_batch_size or recipe.batch_size))
    return train, test


def misclassified(model, loader, n=10):
    """Indices (into loader's images), predicted and true labels of n test images the model
    gets wrong, taken in turn from each true class (a data set stored class by class would
    otherwise show n errors of its first class)."""
    if loader.shuffle:
        raise ValueError("misclassified needs a loader that does not shuffle, so that indices "
                         "point at its images: pass the test loader")
    log_probs, labels = predict(model, loader)
    pred = log_probs.argmax(1)
    wrong = (pred != labels).nonzero().flatten()
    per_class = [wrong[labels[wrong] == c] for c in labels[wrong].unique()]
    # round-robin: the first error of every class, then the second of every class, ...
    turns = [errors[k] for k in range(max(map(len, per_class), default=0))
             for errors in per_class if k < len(errors)]
    picked = torch.stack(turns[:n]) if turns else wrong
    return picked.cpu(), pred[picked].cpu(), labels[picked].cpu()


def norm_by_hand(x, layer):
    """A norm layer's output recomputed from plain tensor ops: the mean and (biased) variance
    over the layer's axes, then its per-channel scale and shift. BatchNorm in eval mode uses
    its running statistics instead of the batch's."""
    scale, shift = layer.weight.view(1, -1, 1, 1), layer.bias.view(1, -1, 1, 1)
    if isinstance(layer, torch.nn.BatchNorm2d):
        if layer.training:                                   # over (N, H, W), per channel
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False)
        else:
            mean = layer.running_mean.view(1, -1, 1, 1)
            var = layer.running_var.view(1, -1, 1, 1)
        x_hat = (x - mean) / torch.sqrt(var + layer.eps)
    elif isinstance(layer, torch.nn.GroupNorm):              # LayerNorm2d is GroupNorm(1, C)
        groups = x.reshape(x.shape[0], layer.num_groups, -1)  # (N, G, C/G * H * W)
        mean = groups.mean(dim=-1, keepdim=True)
        var = groups.var(dim=-1, keepdim=True, unbiased=False)
        x_hat = ((groups - mean) / torch.sqrt(var + layer.eps)).reshape(x.shape)
    else:
        raise TypeError(f"norm_by_hand knows BatchNorm2d and GroupNorm, not {type(layer).__name__}")
    return x_hat * scale + shift


# ----------------------------------------------------------------------------- results files

def _atomic_write(path, write, binary=False):
    """Write a file whole or not at all: into a temporary file beside it, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_results(path, norm, params, device, data, seed, history, **extra):
    """doc/results/<norm>.json: what was trained, on what, and the per-epoch history."""
    record = dict(norm=norm, params=params, device=str(device), data=data, seed=seed,
                  history=history, **extra)
    return save_json(path, record)


def save_json(path, obj, indent=1):
    """Write obj as JSON, whole or not at all; returns obj."""
    _atomic_write(path, lambda f: json.dump(obj, f, indent=indent))
    return obj


def load_results(path):
    with open(path) as f:
        record = json.load(f)
    missing = {"norm", "params", "device", "data", "seed", "history"} - set(record)
    if missing:
        raise ValueError(f"{path}: results file lacks {sorted(missing)}")
    return record


def recipe_dict(recipe):
    return asdict(recipe)


def recipe_from_dict(record):
    """The Recipe that recipe_dict wrote."""
    record = dict(record)
    augment = Augment(**record.pop("augment"))
    return Recipe(**record, augment=augment)


def summarize(history):
    """The headline numbers of one run."""
    first70 = next((h["epoch"] for h in history if h["test_acc"] >= 70), None)
    last = history[-1]
    return dict(epochs=len(history), final_train_acc=last["train_acc"], final_test_acc=last["test_acc"],
                best_test_acc=max(h["test_acc"] for h in history), first_epoch_70=first70,
                seconds_per_epoch=round(sum(h["seconds"] for h in history) / len(history), 1),
                gap=round(last["train_acc"] - last["test_acc"], 2))


def results_table(records):
    """The README's results table, in Markdown, from results records (one per norm)."""
    rows = ["| norm | build | parameters | final train acc | final test acc | best test acc | "
            "first epoch ≥ 70% | s/epoch | epochs | hardware | data | seed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        s = summarize(r["history"])
        rows.append(f"| {NORMS.get(r['norm'], r['norm'])} | {r.get('build', '?')} | {r['params']:,} | "
                    f"{s['final_train_acc']:.2f}% | **{s['final_test_acc']:.2f}%** | {s['best_test_acc']:.2f}% | "
                    f"{s['first_epoch_70'] or '-'} | {s['seconds_per_epoch']} | {s['epochs']} | "
                    f"{r['device']} | {r['data']} | {r['seed']} |")
    return "\n".join(rows)


def _replace_block(text, name, body):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise ValueError(f"the text lacks the {start} ... {end} markers around its {name} block")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}"


def _fill_blocks(paths, blocks):
    """Write each generated block {name: body} into whichever of the Markdown files holds its markers
    (the README, or doc/tuning.md for the tuning narrative's tables); a block no file holds is an error."""
    texts = {path: Path(path).read_text() for path in paths}
    for name, body in blocks.items():
        holders = [path for path, text in texts.items() if f"<!-- {name}:start -->" in text]
        if not holders:
            raise ValueError(f"no file of {', '.join(str(p) for p in paths)} has the <!-- {name}:start --> ... "
                             f"<!-- {name}:end --> markers: put them where the {name} table belongs")
        for path in holders:
            texts[path] = _replace_block(texts[path], name, body)
    for path, text in texts.items():
        Path(path).write_text(text)


def read_jsonl(path):
    """The records of a .jsonl results file, one per line; none when the file does not exist yet."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _flat_recipe(recipe, norm=None):
    """A recipe record as one flat dict (augment's fields inline), for comparing two of them.
    Given a norm other than GroupNorm, `groups` is left out: it changes nothing in that run.
    A record from before a Recipe field existed trained as that field's default (ADDED_FIELDS)."""
    recipe = {**ADDED_FIELDS, **(recipe or {})} if recipe else {}
    flat = {**{k: v for k, v in recipe.items() if k != "augment"}, **(recipe.get("augment") or {})}
    if norm is not None and norm != "gn":
        flat.pop("groups", None)
    return flat


def _recipe_diff(old, new, norm=None):
    """(field, old value, new value) for each field where two recipe records of `norm` differ."""
    a, b = _flat_recipe(old, norm), _flat_recipe(new, norm)
    return [(k, a.get(k), b.get(k)) for k in b if a.get(k) != b.get(k)]


def _signed(points):
    """A difference in points with its sign, e.g. "+0.26"; one that rounds to nothing reads "+0.00", not "-0.00"."""
    return f"{round(float(points), 2) + 0.0:+.2f}"


def _describe(diff):
    """A recipe diff as text, e.g. "batch_size 128 → 64, lr 0.05 → 0.1"; a run longer than the
    course allows says so, so that no table reads it as a candidate recipe."""
    def one(k, x, y):
        beyond = k == "epochs" and y > MAX_EPOCHS
        return f"{k} {x} → {y}" + (f" (beyond the {MAX_EPOCHS}-epoch limit: a diagnostic)" if beyond else "")
    return ", ".join(one(k, x, y) for k, x, y in diff)


def recipe_changes(old, new, norm=None):
    """What differs between two recipe records, e.g. "batch_size 128 → 64"."""
    return _describe(_recipe_diff(old, new, norm)) or "nothing"


def _same_recipe(a, b, norm):
    """Whether two recipe records train `norm` the same way."""
    return _flat_recipe(a, norm) == _flat_recipe(b, norm)


def _same_notebook_recipe(run, record):
    """Whether a seed run (benchmarks/sweep.py --notebook-seeds) trained a record's recipe.
    Runs from before the recipe was recorded carry only their build (none: the reference build)."""
    if "notebook_recipe" in run:
        return _same_recipe(run["notebook_recipe"], record.get("recipe"), record["norm"])
    return run.get("notebook_build", "reference") == record.get("build", "reference")


def machine(record):
    """"GPU" or "CPU" for a run's or a notebook record's device; None where it is not recorded."""
    device = record.get("device", "")
    return "GPU" if device.startswith(("NVIDIA", "cuda")) else "CPU" if device.startswith("CPU") else None


def _seed_accuracies(record, runs, on=None):
    """{seed: final test accuracy} of the runs that trained a notebook record's recipe.

    By default: the record itself (seed 1) and the seed runs on its own kind of machine, since
    the GPU's bf16 and the CPU's float32 arithmetic are not the same experiment. With `on`
    ("GPU" or "CPU") another machine's runs of that recipe, seed 1 included, without the record."""
    own = machine(record)
    accs = {} if on is not None and on != own else {1: record["history"][-1]["test_acc"]}
    want = on or own
    for x in runs:
        if (x.get("name") == "notebook" and x["norm"] == record["norm"] and "final" in x
                and x["seed"] not in accs and (want is None or machine(x) in (want, None))
                and _same_notebook_recipe(x, record)):
            accs[x["seed"]] = x["final"]
    return accs


def _target_met(accs, target):
    """Whether {seed: final test accuracy} meets a target: the notebook run (seed 1) reaches it and
    the mean of three seeds is at most one point below it."""
    mean = float(np.mean(list(accs.values())))
    if accs[1] < target or (len(accs) >= 3 and mean < target - 1):
        return "no"
    if len(accs) >= 3:
        return "**yes**"
    missing = [str(k) for k in (2, 3) if k not in accs]
    return f"notebook run yes; seed{'s' * (len(missing) > 1)} {' and '.join(missing)} not run"


def _seed_spread(accs, bold=False):
    """'mean ± std% (n seeds)' of {seed: final test accuracy}, the mean ± std part in bold if asked;
    '-' for a single seed, which has no spread."""
    values = [accs[k] for k in sorted(accs)]
    if len(values) < 2:
        return "-"
    mark = "**" if bold else ""
    return f"{mark}{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}%{mark} ({len(values)} seeds)"


def headline_table(records, runs, targets=TARGETS):
    """The README's opening table: each notebook with its build, its own run's final test accuracy,
    the mean ± std over its seeds and whether its target is met (targets_table has the detail)."""
    rows = ["| notebook | norm | build | final test acc (notebook run) | mean ± std over seeds | target | met | "
            "measured on |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        accs = _seed_accuracies(r, runs)
        name = f"S8_{NORMS[r['norm']]}.ipynb"
        rows.append(f"| [{name}]({name}) | {NORMS[r['norm']]} | {r.get('build', 'reference')} | "
                    f"**{accs[1]:.2f}%** | {_seed_spread(accs)} | {targets[r['norm']]:.1f}% | "
                    f"{_target_met(accs, targets[r['norm']])} | {r.get('device', '?')} |")
    return "\n".join(rows)


def targets_table(records, runs, targets=TARGETS):
    """Each current notebook run against its target: the run itself must reach it, and the mean of
    three seeds (the notebook's and seeds 2 and 3) must be at most one point below it."""
    rows = ["| norm | target | notebook run (seed 1) | run − target | seeds run | mean | mean − target | "
            "target met |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        target = targets[r["norm"]]
        accs = _seed_accuracies(r, runs)
        run, mean = accs[1], float(np.mean(list(accs.values())))
        met = _target_met(accs, target)
        means = f"{mean:.2f}% | {_signed(mean - target)}" if len(accs) > 1 else "- | -"
        rows.append(f"| {NORMS[r['norm']]} | {target:.1f}% | {run:.2f}% | {_signed(run - target)} | "
                    f"{', '.join(str(k) for k in sorted(accs))} | {means} | {met} |")
    return "\n".join(rows)


def seeds_table(records, runs):
    """Final test accuracy of each notebook run (seed 1) plus the extra seeds run through the same
    recipe (`benchmarks/sweep.py --notebook-seeds`): mean ± std where there are several. The first
    record of each norm is the current one; the others are labelled by how their recipe differed.
    Runs of a record's recipe on the other kind of machine get a row of their own below it."""
    rows = ["| norm | recipe | notebook run (seed 1) | seed 2 | seed 3 | mean ± std |",
            "|---|---|---|---|---|---|"]
    current = {}

    def row(norm, label, accs):
        cells = " | ".join(f"{accs[k]:.2f}%" if k in accs else "not run" for k in (1, 2, 3))
        return f"| {NORMS[norm]} | {label} | {cells} | {_seed_spread(accs, bold=True)} |"
    for r in records:
        current.setdefault(r["norm"], r)
        build = r.get("build", "reference")
        earlier = [f"{k} {x}" for k, x, _ in _recipe_diff(r.get("recipe"), current[r["norm"]].get("recipe"), r["norm"])
                   if k != "build"]
        label = ", ".join([f"{build} build"] + earlier)
        rows.append(row(r["norm"], label, _seed_accuracies(r, runs)))
        for other in {"GPU", "CPU"} - {machine(r)} if machine(r) else ():
            accs = _seed_accuracies(r, runs, on=other)
            if accs:
                rows.append(row(r["norm"], f"{label}: the same recipe on the {other} (sweep runs; the "
                                           f"first column is the sweep's seed 1)", accs))
    return "\n".join(rows)


def effect_table(records, earlier, proxies):
    """What moved the number: each notebook run (seed 1, 20 epochs) against the one before it
    for the same norm, named by what its recipe changed; plus the 4-epoch CPU proxies of the
    two builds."""
    rows = ["| norm | what changed | run | before | after | change |", "|---|---|---|---|---|---|"]
    by_widths = {(x["norm"], x["build"]["widths"]): x for x in proxies if "final" in x}
    for norm in NORMS:
        ref, sep = by_widths.get((norm, "ref")), by_widths.get((norm, "s1"))
        if ref and sep:
            rows.append(f"| {NORMS[norm]} | build reference → separable | {len(sep['history'])}-epoch CPU "
                        f"proxy | {ref['final']:.2f}% | {sep['final']:.2f}% | **{_signed(sep['final'] - ref['final'])}** |")
    for r in records:
        chain = [e for e in earlier if e["norm"] == r["norm"]] + [r]
        for a, b in zip(chain, chain[1:]):
            x, y = a["history"][-1]["test_acc"], b["history"][-1]["test_acc"]
            rows.append(f"| {NORMS[r['norm']]} | {recipe_changes(a.get('recipe'), b.get('recipe'), r['norm'])} | "
                        f"{len(b['history'])}-epoch notebook runs | {x:.2f}% ({a['device']}) | "
                        f"{y:.2f}% ({b['device']}) | **{_signed(y - x)}** |")
    return "\n".join(rows)


def trials_table(runs, records=()):
    """Every trial of the sweeps: configuration, epochs and final test accuracy. Runs through the
    notebooks' recipe name their changes to it: to the current notebook `records` where a run
    recorded its recipe (and groups for GroupNorm), else "the notebooks' recipe" of their time."""
    current = {r["norm"]: r for r in reversed(list(records))}

    def recipe_text(x):
        if not x["name"].startswith("notebook"):
            changes = dict(x.get("recipe") or {}, **(x.get("augment") or {}))
            if x["norm"] == "gn":
                changes["groups"] = x["groups"]
            return ", ".join(f"{k}={v}" for k, v in changes.items())
        if "notebook_recipe" in x and x["norm"] in current:
            diff = _describe([d for d in _recipe_diff(current[x["norm"]].get("recipe"), x["notebook_recipe"], x["norm"])
                              if d[0] != "build"])   # the build has its own column
            return ", ".join(["the notebooks' recipe"] + ([diff] if diff else []))
        return "the notebooks' recipe" + (f", groups={x['groups']}" if x["norm"] == "gn" else "")

    rows = ["| norm | trial | seed | params | build (widths, tail padding, skips, dropout, separable blocks) | "
            "recipe changes | epochs | measured on | final train acc | final test acc |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    done = [(x, recipe_text(x)) for x in runs if "final" in x]
    for x, recipe in sorted(done, key=lambda d: (list(NORMS).index(d[0]["norm"]), d[0]["name"],
                                                 d[0].get("notebook_build", ""), d[1], d[0]["seed"])):
        build = x.get("build") or {}
        arch = (f"{build['widths']}, {build['tail_padding']}, {'yes' if build['skips'] else 'no'}, {build['dropout']}, "
                + (" ".join(build["separable"]) if build.get("separable") else "none")
                if build else f"{x.get('notebook_build', 'reference')} build")
        rows.append(f"| {x['norm']} | {x['name']} | {x['seed']} | {x['params']:,} | {arch} | {recipe} | "
                    f"{len(x['history'])} | {machine(x)} | {x['train_final']:.2f}% | {x['final']:.2f}% |")
    return "\n".join(rows)


def _as_run(record):
    """An earlier notebook record in the shape of a sweep run of its recipe."""
    return dict(name="notebook", norm=record["norm"], seed=record.get("seed", 1), device=record.get("device", ""),
                notebook_recipe=record.get("recipe"), final=record["history"][-1]["test_acc"],
                train_final=record["history"][-1].get("train_acc"), history=record["history"])


def _rebased(current, bases, recipe, norm):
    """(index of a base or None, diff): a notebook-path run's recipe as a change to the nearest of the
    current notebook recipe (None) and `bases` (earlier notebook recipes): the one it differs from in
    the fewest fields, the current recipe on a tie. A run of a base itself reads as that base's change
    to the current recipe, so earlier notebook recipes stay changes to today's."""
    own = tuple(_recipe_diff(current, recipe, norm))
    diffs = [tuple(_recipe_diff(b, recipe, norm)) for b in bases]
    if not own or () in diffs:
        return None, own
    best = min(range(len(bases)), key=lambda i: len(diffs[i]), default=None)
    return (best, diffs[best]) if best is not None and len(diffs[best]) < len(own) else (None, own)


def _earlier_recipes(record, earlier, measured_in=None):
    """The `earlier` notebook records of the recipes a norm's notebook trained before its current one
    (each may name its folder under doc/results/earlier/ as "folder"), newest first, one per recipe,
    the current recipe left out; given `measured_in` (runs), only the recipes one of them trained."""
    norm, out = record["norm"], []
    for e in reversed(list(earlier)):
        if (e["norm"] == norm and e.get("recipe")
                and not _same_recipe(e["recipe"], record.get("recipe"), norm)
                and not any(_same_recipe(e["recipe"], o["recipe"], norm) for o in out)
                and (measured_in is None
                     or any(_same_recipe(x["notebook_recipe"], e["recipe"], norm) for x in measured_in))):
            out.append(e)
    return out


def _earlier_rank(base_diff, named):
    """{an earlier recipe's change to today's recipe: its rank, 0 the newest} for the `named` earlier
    records (newest first, as _earlier_recipes returns them) that have a folder; base_diff[i] is
    named[i]'s change. Orders the earlier recipes in the tuning table and the fit-vs-test key."""
    rank = {}
    for i, (diff, record) in enumerate(zip(base_diff, named)):
        if record.get("folder"):
            rank.setdefault(diff, i)
    return rank


def tuning_table(runs, records, earlier=()):
    """Changes to the notebook recipes, each one's mean over its seeds against the nearest recipe
    measured on the same kind of machine (bf16 on a GPU is not the CPU's float32, so a comparison
    never crosses machines). A run is named by its change to the recipe it is nearest to: the
    current notebook recipe or, for a trial from before that recipe changed, the earlier notebook
    recipe it changed (the "changed from" column names it by its folder under doc/results/earlier/,
    and its own row, its change to today's recipe, stands just above its trials; `earlier` notebook
    records count as runs of their recipe). Rows: today's recipe and its trials first, then the
    earlier recipes, newest first. Against: of the measured recipes that make only some of the
    row's changes (the recipe it changed makes none), the one that makes the most, an earlier
    recipe named by its folder. The unchanged recipe's seeds on the notebook's own machine include
    the notebook run. A recipe has one accuracy per seed and machine (a sweep run that repeats an
    earlier notebook run is not counted twice)."""
    rows = ["| norm | measured on | changed from | change | seeds | mean | against the nearest measured recipe |",
            "|---|---|---|---|---|---|---|"]
    everything = list(runs) + [_as_run(e) for e in earlier if e.get("recipe")]
    for r in records:
        norm, current = r["norm"], r.get("recipe")
        mine = [x for x in everything if x["norm"] == norm and x.get("name", "").startswith("notebook")
                and x.get("notebook_recipe") and "final" in x and machine(x)]
        for on in ("CPU", "GPU"):
            here = [x for x in mine if machine(x) == on]
            # an earlier recipe is a base on this machine only where it was measured here itself
            named = _earlier_recipes(r, earlier, measured_in=here)
            bases = [e["recipe"] for e in named]
            groups = {}
            for x in here:
                base, diff = _rebased(current, bases, x["notebook_recipe"], norm)
                if base is not None or diff:
                    groups.setdefault((base, diff), {}).setdefault(x["seed"], x["final"])
            own = list(_seed_accuracies(r, runs, on=on).values())
            if own:
                groups[(None, ())] = dict(enumerate(own))
            if not groups:
                continue
            base_diff = [tuple(_recipe_diff(current, b, norm)) for b in bases]

            def label(diff):
                return _describe(diff) or "none (the notebook's recipe)"

            def name(i):    # an earlier recipe by its folder's name, else by its change to today's
                folder = named[i].get("folder")
                return f"its earlier recipe `{folder}`" if folder else label(base_diff[i])

            earlier_rank = _earlier_rank(base_diff, named)

            def emit(base, diff, changed_from, suffix=""):
                accs = list(groups[(base, diff)].values())
                spread = f" ± {np.std(accs, ddof=1):.2f}" if len(accs) > 1 else ""
                pool = {d: list(v.values()) for (b, d), v in groups.items() if b == base}
                if base is not None:         # the recipe it changed: that recipe's own runs
                    pool[()] = list(groups[(None, base_diff[base])].values())
                nearer = [d for d in pool if set(d) < set(diff)]
                if base is None and not diff:
                    delta = "-"
                elif not nearer:
                    delta = "no run of a recipe it changes"
                else:
                    near = max(nearer, key=len)
                    delta = f"**{_signed(np.mean(accs) - np.mean(pool[near]))}**"
                    if near and base is None and near in earlier_rank:
                        delta += f" against {name(earlier_rank[near])}"
                    elif near:
                        delta += f" against {label(near)}"
                rows.append(f"| {NORMS[norm]} | {on} | {changed_from} | {label(diff)}{suffix} | {len(accs)} | "
                            f"{np.mean(accs):.2f}{spread}% | {delta} |")

            # the recipe, then its trials, then the earlier recipes newest first, each above its trials
            for diff in sorted((d for b, d in groups if b is None),
                               key=lambda d: (d != (), earlier_rank.get(d, -1), label(d))):
                was = [i for i, d in enumerate(base_diff) if d == diff]
                emit(None, diff, "-" if not diff else "the notebook's recipe",
                     f" ({name(was[0])})" if was and named[was[0]].get("folder") else "")
                for i in was:   # the trials that changed this earlier recipe, just below it
                    for kid in sorted((k for b, k in groups if b == i), key=label):
                        emit(i, kid, name(i))
    return "\n".join(rows)


def jpeg_table(records, jpeg_runs, runs=(), earlier=()):
    """The data diagnostic (benchmarks/jpeg_quality.py): each run of a notebook's recipe on the copy
    re-encoded at a lower JPEG quality, or at its own quality with the block grid moved, against the
    run of the same recipe, seed and kind of machine on the copy as it is (the notebook's own run for
    seed 1, else a seed run from `runs`), from which it differs only in the pixels; per re-encoding
    with several seeds, the mean change. Runs of a recipe the notebook had before (`earlier`
    records) compare with that recipe's runs and say which recipe it was."""
    rows = ["| norm | JPEG re-encoding | seed | mean change per pixel | final train acc | final test acc | "
            "the copy, same seed | change |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        recipes = [(r, NORMS[r["norm"]])] + [
            (e, f"{NORMS[r['norm']]} (its earlier recipe `{e['folder']}`)" if e.get("folder") else NORMS[r["norm"]])
            for e in _earlier_recipes(r, earlier)]
        for rec, who in recipes:
            on_copy = _seed_accuracies(rec, runs)
            same = sorted((x for x in jpeg_runs if x.get("norm") == r["norm"] and "final" in x
                           and x.get("seed") in on_copy and machine(x) == machine(rec)
                           and _same_notebook_recipe(x, rec)),
                          key=lambda x: (-x["jpeg_quality"], x.get("jpeg_shift", 0), x["seed"]))
            for quality, shift in dict.fromkeys((x["jpeg_quality"], x.get("jpeg_shift", 0)) for x in same):
                how = f"quality {quality}" + (f", block grid moved {shift} px" if shift else "")
                changes = []
                for x in (x for x in same if (x["jpeg_quality"], x.get("jpeg_shift", 0)) == (quality, shift)):
                    changes.append(x["final"] - on_copy[x["seed"]])
                    rows.append(f"| {who} | {how} | {x['seed']} | {x['mean_abs_change']:.2f} levels "
                                f"of 255 | {x['train_final']:.2f}% | {x['final']:.2f}% | {on_copy[x['seed']]:.2f}% | "
                                f"**{_signed(changes[-1])}** |")
                if len(changes) > 1:
                    rows.append(f"| {who} | {how} | mean of {len(changes)} | | | | | "
                                f"**{_signed(np.mean(changes))}** |")
    return "\n".join(rows)


def base_batch(run):
    """The batch a benchmarks/batch_size.py run scaled its lr from (the notebooks' batch when it ran). Runs from
    before the record carried it all scaled from 64, the notebooks' batch then."""
    return run.get("base_batch", 64)


def _batch_sweeps(runs):
    """benchmarks/batch_size.py records grouped by the sweep they belong to (everything but norm, batch and
    seed the same: epochs, training images, machine, data, the batch the lr scales from), in the order they
    first appear."""
    sweeps = {}
    for r in runs:
        sweeps.setdefault((r["epochs"], r["train_subset"], machine(r), r["data"], base_batch(r)), []).append(r)
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
        pooled = (f"seeds {', '.join(map(str, seeds))} (each cell the mean over them, ± their standard deviation)"
                  if len(seeds) > 1 else f"seed {seeds[0]}")
        rows = [f"Measured on {first['device']}, data `{first['data']}`, {pooled}, {first['epochs']} "
                f"epochs on {first['train_subset']:,} training images, the full test set; each norm's notebook "
                f"recipe with lr scaled by batch / {base_batch(first)} and no weight average. Final test accuracy "
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


def speed_table(records):
    """benchmarks/speed.py results, one row per machine; records from before a column existed
    show "-" there (their build was the reference one)."""
    columns = ["pipeline: ours (utils.Loader)", "pipeline: conventional (PIL + DataLoader, 2 workers)",
               "compute floor (one batch, repeated)", "compute floor, NCHW layout", "our training epoch",
               "evaluation"]
    rows = ["| machine | build | ours: pipeline | conventional pipeline | compute floor | compute floor, NCHW | "
            "our training epoch | evaluation | s per epoch | overhead | pipeline speed-up | channels_last speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rate = {row["what"]: row["images_per_s"] for row in r["rows"]}
        rates = " | ".join(f"{rate[c]:,.0f}" if c in rate else "-" for c in columns)
        layout = f"**{r['channels_last_speedup']:.2f}x**" if "channels_last_speedup" in r else "-"
        rows.append(f"| {r['device']} (torch {r['torch']}) | {r.get('build', 'reference')} | {rates} | "
                    f"{r['epoch_seconds']} | **{r['overhead']:.2f}** | **{r['pipeline_speedup']:.1f}x** | {layout} |")
    return "\n".join(rows)


def lr_range_table(records):
    """benchmarks/lr_range.py results, one row per norm: where each range test's loss fell fastest
    and where it bottomed out, against the peak lr the norm's recipe trains with."""
    rows = ["| norm | build | steps run (of planned) | steepest fall at lr | lowest loss at lr | "
            "recipe's peak lr | measured on | data | seed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rows.append(f"| {NORMS[r['norm']]} | {r['build']} | {len(r['lr'])} of {r['steps']} | "
                    f"{r['lr_steepest']:.3g} | {r['lr_at_min']:.3g} | **{r['recipe_lr']:g}** | "
                    f"{machine(r)}, batch {r['batch_size']} | {r['data']} | {r['seed']} |")
    return "\n".join(rows)


def _notebook_lines(path, prefix):
    """Output lines of an executed notebook that start with prefix (numbers quoted from its run)."""
    nb = json.loads(Path(path).read_text())
    return [line for cell in nb["cells"] if cell["cell_type"] == "code" for out in cell.get("outputs", [])
            if out.get("output_type") == "stream" for line in "".join(out["text"]).splitlines()
            if line.startswith(prefix)]


def read_trials(results_dir):
    """Every trial record of the sweeps: the lines of all trials-*.jsonl files in results_dir."""
    return [x for path in sorted(Path(results_dir).glob("trials-*.jsonl")) for x in read_jsonl(path)]


def earlier_records(results_dir, records):
    """The earlier notebook runs under results_dir/earlier/<n>-<label>/<norm>.json, one list per
    folder, oldest folder first, each record tagged with its folder's name ("folder"). A run that
    trained the current recipe of one of `records` is that current run itself and is left out."""
    current = {r["norm"]: r.get("recipe") for r in records}
    folders = sorted(p for p in Path(results_dir).glob("earlier/*") if p.is_dir())
    return [[dict(r, folder=f.name)
             for r in (load_results(f / f"{n}.json") for n in NORMS if (f / f"{n}.json").exists())
             if not _same_recipe(r.get("recipe"), current.get(r["norm"]), r["norm"])] for f in folders]


def render_report(root="."):
    """Rewrite the generated blocks of the README (headline, results, seeds, targets, effects, speed, data
    statistics, batch sizes, lr range tests, trials) and of doc/tuning.md (tuning, JPEG quality), and doc/trials.md,
    doc/comparison.png, doc/bn_fit_vs_test.png, doc/batch_size.png and doc/lr_range.png, from doc/results/
    and the executed notebooks."""
    root = Path(root)
    results_dir = root / "doc" / "results"
    records = [load_results(results_dir / f"{n}.json") for n in NORMS
               if (results_dir / f"{n}.json").exists()]
    if not records:
        raise FileNotFoundError(f"no results in {results_dir}: run the notebooks first")
    plot_comparison({NORMS[r["norm"]]: r["history"] for r in records}, path=root / "doc" / "comparison.png")
    runs = read_trials(results_dir)
    by_folder = earlier_records(results_dir, records)
    earlier = [r for group in by_folder for r in group]
    for r in records:
        if r["norm"] == "bn":      # the norm still short of its target, with the most trials
            plot_fit_vs_test(r, runs, TARGETS["bn"], path=root / "doc" / "bn_fit_vs_test.png", earlier=earlier)
    trials = trials_table(runs, records)
    _atomic_write(root / "doc" / "trials.md", lambda f: f.write(
        "# Trials\n\nEvery training of the sweeps (`benchmarks/sweep.py`), written from "
        "`doc/results/trials-*.jsonl`: full 20-epoch runs (GPU: an NVIDIA H200; CPU: the project's "
        "2-core machine), and short CPU proxies (the epochs column says 4; their one-cycle schedule "
        "spans those 4 epochs) that rank ideas before a full run. Every run used the JPEG copy of "
        "CIFAR-10. Unless a column says otherwise: SGD with Nesterov momentum 0.9, "
        "one-cycle learning rate with peak lr 0.05, weight decay 5e-4, batch 128, no label smoothing, "
        "flip p=0.5 and a random crop with padding 4 (no rotation). The width names `ref`, `a`, `b`, `c`, "
        "`s1`, `s2` are the C1 C2 c3 C3 C4 C5 c6 C7 C8 C9 widths listed in `benchmarks/sweep.py` "
        "(`WIDTHS`). \"notebook\" rows train through the notebooks' code path with the build named; "
        "their recipe column lists what differs from the current notebook's recipe for that norm "
        "(\"a → b\": the notebook has a, the run had b), or says \"the notebooks' recipe\" for runs "
        "from before the recipe was recorded. GPU runs compute in bf16 autocast, CPU runs in float32.\n\n"
        + trials + "\n"))
    speeds = [json.loads(p.read_text()) for p in sorted(results_dir.glob("speed-*.json"))]
    stats = "\n".join(_notebook_lines(root / "S8_BatchNorm.ipynb", "mean:") +
                      _notebook_lines(root / "S8_BatchNorm.ipynb", "std: "))
    blocks = {
        "headline": headline_table(records, runs),
        "results": results_table(records),
        "seeds": seeds_table(records + [r for group in by_folder[::-1] for r in group], runs),
        "targets": targets_table(records, runs),
        "trials": trials,
        "tuning": tuning_table(runs, records, earlier),
        "effects": effect_table(records, earlier, read_jsonl(results_dir / "trials-proxy.jsonl")),
        "speed": speed_table(speeds),
        "jpeg": jpeg_table(records, read_jsonl(results_dir / "jpeg-quality.jsonl"), runs, earlier),
        "stats": f"```\n{stats}\n```",
    }
    batch_runs = read_jsonl(results_dir / "batch-size.jsonl")
    if batch_runs:
        plot_batch_sizes(batch_runs, path=root / "doc" / "batch_size.png")
    blocks["batch-size"] = batch_size_table(batch_runs)
    lr_range = results_dir / "lr-range.json"
    if lr_range.exists():
        lr_records = json.loads(lr_range.read_text())
        plot_lr_range(lr_records, path=root / "doc" / "lr_range.png")
        blocks["lr-range"] = lr_range_table(lr_records)
    _fill_blocks([root / "README.md", root / "doc" / "tuning.md"], blocks)


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib.pyplot as plt
    return plt


def _finish(fig, path):
    """Save with a fixed dpi and no software stamp, so reruns give the same bytes."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    return fig


def show_images(images, labels=None, classes=CLASSES, captions=None, nrows=4, ncols=8, path=None,
                title=None):
    """A grid of uint8 images (N, 3, H, W), captioned by class name, or by `captions` if given."""
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 1.5 * nrows + (0.4 if title else 0)))
    for i, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if i >= len(images):
            continue
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
        if captions is not None:
            ax.set_title(captions[i], fontsize=8)
        elif labels is not None:
            ax.set_title(classes[int(labels[i])], fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def denormalize(x, mean, std):
    """Normalised float images back to uint8, for showing what the network sees."""
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def plot_history(history, title="", path=None):
    """Loss and accuracy per epoch, train and test side by side."""
    plt = _plt()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, ms=3, label=split)
        ax_acc.plot(epochs, [h[f"{split}_acc"] for h in history], style, ms=3, label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title} loss".strip())
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title} accuracy".strip())
    ax_acc.axhline(70, color="grey", lw=0.8, ls="--")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _finish(fig, path)


def plot_comparison(histories, path=None):
    """Several runs' test accuracy and train loss on shared axes: histories = {label: history}."""
    plt = _plt()
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
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def plot_batch_sizes(runs, path=None):
    """The last batch-size sweep of _batch_sweeps (benchmarks/batch_size.py): final test accuracy (solid, with
    the seeds' standard deviation as error bars where there are several) and final train accuracy (dotted)
    against the batch size, means over the seeds, one colour per norm."""
    sweep = _batch_sweeps(runs)[-1]
    means = batch_size_means(sweep)
    batches = sorted({b for _, b in means})
    seeds = sorted({r["seed"] for r in sweep})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for norm in NORMS:
        mine = [(b, means[norm, b]) for b in batches if (norm, b) in means]
        if not mine:
            continue
        xs = [b for b, _ in mine]
        line = ax.errorbar(xs, [m["final"] for _, m in mine], yerr=[m["std"] or 0 for _, m in mine], fmt="-o",
                           capsize=3, label=f"{NORMS[norm]} test")[0]
        ax.plot(xs, [m["train_final"] for _, m in mine], ":", color=line.get_color(), label=f"{NORMS[norm]} train")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, labels=batches)
    ax.set(xlabel="batch size (peak lr scaled by batch / 64)", ylabel="final accuracy (%)",
           title=f"Batch size: {sweep[0]['epochs']} epochs on {sweep[0]['train_subset']:,} images, "
                 + (f"mean of seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=labels.__getitem__)     # each norm's test line beside its train line
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def plot_lr_range(records, path=None):
    """Learning-rate range tests (records as benchmarks/lr_range.py writes them, one per norm): each
    norm's smoothed training loss against the lr (log scale, raw loss faint), its steepest fall
    (triangle) and lowest point (circle), and the peak lr its recipe trains with (dashed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in records:
        line, = ax.plot(r["lr"], r["smoothed"], label=NORMS[r["norm"]])
        color = line.get_color()
        ax.plot(r["lr"], r["loss"], color=color, alpha=0.15, lw=0.8)
        for key, marker in (("lr_steepest", "v"), ("lr_at_min", "o")):
            i = r["lr"].index(r[key])
            ax.plot(r["lr"][i], r["smoothed"][i], marker, color=color, ms=7)
    for i, lr in enumerate(sorted({r["recipe_lr"] for r in records})):
        ax.axvline(lr, color="k", ls="--", lw=0.8, label="the recipe's peak lr" if i == 0 else None)
    start = max(r["smoothed"][0] for r in records)
    lowest = min(v for r in records for v in r["smoothed"] if math.isfinite(v))
    ax.set(xscale="log", ylim=(lowest * 0.9, start * 1.15), xlabel="learning rate (log scale)",
           ylabel="training loss (smoothed)",
           title="LR range test: \u25bc steepest fall, \u25cf lowest loss, dashed: the recipe's peak lr")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    return _finish(fig, path)


FIT_VS_TEST_FLOOR = 5.0   # points under the notebook run where plot_fit_vs_test's axis stops


def plot_fit_vs_test(record, runs, target=None, path=None, earlier=()):
    """Final train accuracy against final test accuracy of every full run of one norm through the
    notebooks' code path on the notebook record's kind of machine: the notebook's recipe (its run and
    seeds) and each recipe that changes it, labelled by the change. A trial nearer an earlier
    notebook recipe (`earlier` records, whose own runs count too) is labelled by its change to that
    one, "on" its number, as in tuning_table. Where the points spread along train accuracy and not
    along test accuracy, the changes moved how well the network fits its training set and not how
    well it generalises. A change that ended more than FIT_VS_TEST_FLOOR points under the notebook
    run is drawn on the axis floor, with its accuracy written beside it."""
    plt = _plt()
    norm, own, epochs = record["norm"], machine(record), len(record["history"])

    def full(x):
        return (x.get("name") == "notebook" and x["norm"] == norm and "final" in x and x.get("notebook_recipe")
                and machine(x) == own and len(x.get("history", ())) == epochs)

    def run_of(x):
        return tuple(_recipe_diff(record.get("recipe"), x["notebook_recipe"], norm)), x["seed"]
    pool = [x for x in runs if full(x)]
    swept = {run_of(x) for x in pool}
    # an earlier notebook run counts where no sweep run repeats it (same recipe and seed)
    pool += [x for x in map(_as_run, (e for e in earlier if e.get("recipe"))) if full(x) and run_of(x) not in swept]
    if not pool:
        raise ValueError(f"no {epochs}-epoch notebook-path runs of {norm!r} on the {own} among the trials")
    named = _earlier_recipes(record, earlier, measured_in=pool)
    bases = [e["recipe"] for e in named]
    points = [(*_rebased(record.get("recipe"), bases, x["notebook_recipe"], norm), x["seed"], x["train_final"],
               x["final"]) for x in pool]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    # a sweep run of the notebook's own recipe and seed repeats the notebook run: drawn once (as tuning_table)
    mine = [(a, b) for base, diff, seed, a, b in points
            if base is None and not diff and seed != record.get("seed", 1)]
    last = record["history"][-1]
    mine.append((last["train_acc"], last["test_acc"]))
    ax.plot(*zip(*mine), "o", ms=8, color="C0", label="the notebook's recipe (its run and seeds)")

    def text(diff):
        return _describe(diff).replace(" → ", "→")
    changed = [(base, diff, a, b) for base, diff, _, a, b in points if base is not None or diff]
    # A change that failed outright would squash every other run into one line: the axis stops a few
    # points under the notebook run, and such a run sits on that floor, its accuracy written beside it.
    floor = last["test_acc"] - FIT_VS_TEST_FLOOR
    kept = [c for c in changed if c[3] >= floor]
    fallen = [c for c in changed if c[3] < floor]
    if kept:
        ax.plot([a for *_, a, _ in kept], [b for *_, b in kept], "s", ms=6, color="C1",
                label="a change to it (numbered, key on the right)")
    if fallen:
        ax.plot([a for *_, a, _ in fallen], [floor] * len(fallen), "v", ms=8, color="C1",
                label=f"a change that ended below {floor:.1f}% (on the floor, its accuracy beside it)")
    # the labels are numbers with a key beside the axes: the runs crowd at similar accuracies; the
    # trials that changed an earlier recipe follow that recipe's own number
    key, lines = {}, []
    base_diff = [tuple(_recipe_diff(record.get("recipe"), b, norm)) for b in bases]
    # an earlier notebook recipe goes by its folder's name, shorter than its change to today's
    called = {d: f"the notebook's earlier recipe {e['folder']}" for d, e in zip(base_diff, named) if e.get("folder")}
    rank = _earlier_rank(base_diff, named)
    # as in tuning_table: the changes to today's recipe, then the earlier recipes newest first
    for diff in sorted({d for base, d, *_ in changed if base is None}, key=lambda d: (rank.get(d, -1), text(d))):
        key[None, diff] = len(key) + 1
        lines.append(f"{key[None, diff]:>2}  {called.get(diff, text(diff))}")
        for i in (i for i, d in enumerate(base_diff) if d == diff):
            for kid in sorted({d for base, d, *_ in changed if base == i}, key=text):
                key[i, kid] = len(key) + 1
                lines.append(f"{key[i, kid]:>2}  on {key[None, diff]}: {text(kid)}")
    for base, diff, a, b in kept:
        ax.annotate(str(key[base, diff]), (a, b), xytext=(4, 3), textcoords="offset points", fontsize=8)
    middle = sum(a for *_, a, _ in changed) / len(changed)
    for base, diff, a, b in fallen:    # its text written towards the middle, away from the axes' edge
        right = a > middle
        ax.annotate(f"{key[base, diff]}: {b:.2f}%", (a, floor), xytext=(-7 if right else 7, 3),
                    textcoords="offset points", fontsize=8, ha="right" if right else "left")
    lines = [textwrap.fill(line, 72, subsequent_indent=" " * 4) for line in lines]
    ax.text(1.02, 1.0, "\n".join(lines), transform=ax.transAxes,
            va="top", ha="left", fontsize=8, family="monospace")
    if target is not None:
        ax.axhline(target, color="C3", ls="--", lw=1, label=f"target {target:g}%")
    ax.set(xlabel="final train accuracy (%, with augmentation and dropout)", ylabel="final test accuracy (%)",
           title=f"{NORMS[norm]}: {epochs}-epoch runs on the {own}, train against test")
    if fallen:
        ax.set_ylim(bottom=floor - 0.3)
    ax.grid(alpha=0.3)
    # below the axes, where it hides no trial and no written accuracy; one column, so that it stays
    # under the axes and clear of the key on their right
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1)
    fig.tight_layout()
    return _finish(fig, path)


def show_augmentations(images, augment, mean, std, seed=0, path=None):
    """Rows: the originals, then each augmentation on its own at full strength, then the recipe's
    own mix, all through the same batched code the loader uses."""
    n = len(images)
    parts = {"original": Augment(flip=0, crop_pad=0),
             "flip": Augment(flip=1, crop_pad=0),
             f"rotate ±{augment.rotate_deg or 10:g}°": Augment(flip=0, crop_pad=0,
                                                            rotate_deg=augment.rotate_deg or 10, rotate_p=1),
             f"crop, pad {augment.crop_pad or 4}": Augment(flip=0, crop_pad=augment.crop_pad or 4),
             **({f"cutout {augment.cutout}": Augment(flip=0, crop_pad=0, cutout=augment.cutout)}
                if augment.cutout else {}),
             "recipe": augment}
    rows = []
    for name, aug in parts.items():
        loader = Loader(images, torch.zeros(n, dtype=torch.int64), mean, std, batch_size=n,
                        augment=aug, seed=seed)
        rows.append(denormalize(next(iter(loader))[0], mean, std))
    grid = torch.cat(rows)
    captions = [name if i == 0 else "" for name in parts for i in range(n)]
    return show_images(grid, captions=captions, nrows=len(parts), ncols=n, path=path)


def plot_misclassified(images, predicted, true, classes=CLASSES, path=None, title=None):
    """Misclassified uint8 images as a 5x2 grid (5 columns, 2 rows), captioned predicted/true."""
    captions = [f"pred: {classes[p]}\ntrue: {classes[t]}" for p, t in zip(predicted.tolist(), true.tolist())]
    return show_images(images, captions=captions, nrows=2, ncols=5, path=path, title=title)


def plot_norm_methods(path=None):
    """Which entries of an (N, C, H*W) activation each norm pools its mean and variance over:
    the blue cells share one mean and one variance."""
    plt = _plt()
    n, c, hw, groups = 4, 6, 4, 3
    chosen = {
        "BatchNorm": lambda i, j: j == 0,                        # one channel, all samples
        "LayerNorm": lambda i, j: i == 0,                        # one sample, all channels
        "GroupNorm": lambda i, j: i == 0 and j < c // groups,    # one sample, one group of channels
    }
    fig = plt.figure(figsize=(12, 4.2))
    for k, (name, picks) in enumerate(chosen.items()):
        ax = fig.add_subplot(1, 3, k + 1, projection="3d")
        filled = np.ones((n, c, hw), dtype=bool)
        colors = np.empty(filled.shape, dtype=object)
        for i in range(n):
            for j in range(c):
                colors[i, j, :] = "#4a90d9" if picks(i, j) else "#eeeeee"
        ax.voxels(filled, facecolors=colors, edgecolors="#555555", linewidth=0.4)
        ax.set_xlabel("N (samples)")
        ax.set_ylabel("C (channels)")
        ax.set_zlabel("H, W")
        ax.set_xticks([]), ax.set_yticks([]), ax.set_zticks([])
        ax.view_init(elev=20, azim=-60)
        ax.set_title(name, fontsize=13)
    fig.suptitle("Blue: the values that share one mean and variance", fontsize=11)
    fig.tight_layout()
    return _finish(fig, path)

"""Data, training, evaluation, results files and plots for the S8 notebooks, in the order the
notebooks use them:

- data: load_cifar10, channel_mean_std, class_sample
- augmentation and loaders: Augment, Loader, make_loaders
- the recipe and the device: Recipe, recipe_for, pick_device
- training and evaluation: fit, evaluate, misclassified
- the learning-rate range test: lr_range_record
- the network's receptive field
- results files: save_results, summarize
- plots

Every notebook calls these; nothing here is notebook-specific. The report that fills README.md from
the results files is benchmarks/report.py.
"""
import gzip
import io
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import re
import tarfile
import tempfile
import time
import urllib.error
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from model import NORMS, ConvBlock, Net, count_parameters

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
SPLIT_SIZES = {"train": 50_000, "test": 10_000}     # CIFAR-10's, 5,000 and 1,000 per class
DATA_ENV = "S8_DATA"          # points load_cifar10 at a local copy
# Part of every cache file's name: bump it when decoding changes, so that no test or run reads
# tensors that an older decoder wrote.
DECODER_VERSION = 2
HOW_TO_PROVIDE = (f"Provide CIFAR-10 in one of these ways: let torchvision download it (needs internet), "
                  f"or set {DATA_ENV} (or pass source=) to (1) a folder holding torchvision's "
                  f"'cifar-10-batches-py', (2) a folder with train/<class>/*.jpg and test/<class>/*.jpg, "
                  f"or (3) a .tar or .tar.gz of that layout.")


# --- Data: CIFAR-10 as uint8 tensors, its statistics, samples of it -------------------------------
@dataclass
class CIFAR10:
    """The whole data set as uint8 tensors: images (N, 3, 32, 32), labels (N,) int64."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple
    source: str     # where it came from, for reports


def load_cifar10(source=None, data_dir="data", full=True):
    """Load CIFAR-10 as uint8 tensors, decoding at most once.

    source: None -> $S8_DATA if set, else torchvision's download into `data_dir`; a folder
    (torchvision's pickles, or train/<class>/ and test/<class>/ image files); or a .tar/.tar.gz of
    the latter. Decoded tensors are cached in `data_dir/cache`, keyed by DECODER_VERSION and the path,
    size and mtime of every file the loader reads. full: check for 50,000 + 10,000 images, 5,000 and
    1,000 per class (False loads a deliberately smaller copy). `source` on the result says what the
    data is (a file's name and kind, never a machine's path), for records and reports."""
    source = source if source is not None else os.environ.get(DATA_ENV) or None
    data_dir = Path(data_dir)
    if source is None:
        folder = _download(data_dir)
    else:
        folder = Path(source).expanduser()
        if not folder.exists():
            raise FileNotFoundError(f"CIFAR-10 source {str(folder)!r} does not exist. {HOW_TO_PROVIDE}")
    cache = data_dir / "cache" / f"cifar10-v{DECODER_VERSION}-{_fingerprint(folder)}.pt"
    saved = None
    if cache.exists():
        try:
            saved = torch.load(cache, weights_only=True)
        except Exception:       # a broken cache is rebuilt, never trusted
            cache.unlink()
    if saved is None:
        splits, classes, kind = _read_source(folder)
        label = "torchvision download (original CIFAR-10)" if source is None else f"{folder.name} ({kind})"
        saved = dict(train_images=splits["train"][0], train_labels=splits["train"][1],
                     test_images=splits["test"][0], test_labels=splits["test"][1], classes=tuple(classes),
                     source=label)
        atomic_write(cache, lambda f: torch.save(saved, f), binary=True)
    data = CIFAR10(**saved)
    if full:
        _check_sizes(data, data.source)
    return data


def _check_sizes(data, where):
    for split, labels in (("train", data.train_labels), ("test", data.test_labels)):
        per_class = torch.bincount(labels, minlength=len(CLASSES)).tolist()
        expected = SPLIT_SIZES[split] // len(CLASSES)
        if len(labels) != SPLIT_SIZES[split] or any(n != expected for n in per_class):
            raise RuntimeError(
                f"{where}: the {split} split has {len(labels):,} images ({per_class} per class); "
                f"CIFAR-10 has {SPLIT_SIZES[split]:,}, {expected:,} per class. The copy is incomplete: "
                f"fetch it again (or pass full=False to load a deliberately smaller set). {HOW_TO_PROVIDE}")


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
    """A source's identity: the path, size and mtime of every file in it (one stat per file, no
    hashing), so that adding, removing or rewriting any file changes it."""
    path = path.resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [str(path)] + [f"{p.relative_to(path) if p != path else p.name}:{st.st_size}:{st.st_mtime_ns}"
                           for p, st in ((p, p.stat()) for p in files)]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def _corrupt(path, e):
    return RuntimeError(f"{str(path)!r} is corrupt or truncated ({type(e).__name__}: {e}). "
                        f"Fetch it again. {HOW_TO_PROVIDE}")


def _read_source(path):
    if path.is_file():
        try:
            readable = tarfile.is_tarfile(path)
            _check_gzip(path)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise _corrupt(path, e) from None
        if not readable:
            raise RuntimeError(f"{str(path)!r} is not a readable .tar/.tar.gz archive (corrupt or "
                               f"truncated?). Fetch it again. {HOW_TO_PROVIDE}")
        return _read_image_tar(path)
    pickles = path / "cifar-10-batches-py" if (path / "cifar-10-batches-py").is_dir() else path
    if (pickles / "batches.meta").exists():
        return *_read_pickles(pickles), "torchvision's original files"
    if (path / "train").is_dir() and (path / "test").is_dir():
        files = ((p.relative_to(path).parts, p.read_bytes) for p in sorted(path.glob("*/*/*")) if p.is_file())
        return _decode_image_files(files, str(path))
    raise RuntimeError(f"{str(path)!r} holds neither 'cifar-10-batches-py' nor train/ and test/ "
                       f"folders. {HOW_TO_PROVIDE}")


def _check_gzip(path):
    """Read a gzip file to its end, so that its CRC and length are checked: tarfile alone stops at
    the archive's end marker and would take a damaged member's bytes as they are."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return
    with gzip.open(path) as f:
        while f.read(1 << 22):
            pass


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
        raise _corrupt(path, e) from e


def _decode_image_files(files, where):
    """files: (path parts, read-bytes callable) pairs; keeps those under <split>/<class>/<file>."""
    found = {"train": [], "test": []}
    for parts, read in files:
        if len(parts) >= 3 and parts[-3] in found and not parts[-1].startswith("."):
            found[parts[-3]].append((parts[-2], "/".join(parts[-3:]), read()))
    splits, suffixes = {}, set()
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
        bar = tqdm(items, desc=f"decoding {split}", mininterval=5, ascii=True)
        for i, (cls, name, data) in enumerate(bar):
            try:
                img = decode_rgb(data)
            except (OSError, ValueError) as e:      # PIL's UnidentifiedImageError is an OSError
                why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "it", str(e))
                raise RuntimeError(f"{where}: cannot decode {name} ({why}). Replace the file or fetch the "
                                   f"copy again. {HOW_TO_PROVIDE}") from None
            if tuple(img.shape) != IMAGE_SHAPE:
                raise RuntimeError(f"{where}: {name} is {img.shape[2]}x{img.shape[1]} pixels; CIFAR-10 "
                                   f"images are 32x32. Point {DATA_ENV} at an unresized copy.")
            images[i], labels[i] = img, CLASSES.index(cls)
            suffixes.add(Path(name).suffix.lower().lstrip("."))
        splits[split] = (images, labels)
    formats = " and ".join(sorted("JPEG" if s in ("jpg", "jpeg") else s.upper() for s in suffixes))
    return splits, list(CLASSES), f"{formats} copy"


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
    """Exact per-channel mean and std of uint8 images in [0, 1], from a histogram of every pixel."""
    if images.dtype != torch.uint8:
        raise TypeError(f"channel_mean_std expects uint8 images, got {images.dtype}")
    counts = torch.stack([torch.bincount(images[:, c].reshape(-1), minlength=256)
                          for c in range(images.shape[1])]).double()                 # (C, 256)
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (counts * values).sum(1) / counts.sum(1)
    std = ((counts * (values - mean[:, None]) ** 2).sum(1) / counts.sum(1)).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def class_sample(labels, per_class=1, seed=0):
    """Indices of `per_class` random images of every class, one of each class in turn (rows of a
    10-column grid then show every class): a data set stored class by class would otherwise show
    only its first class."""
    g = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(labels == c).flatten() for c in range(len(CLASSES))]
    picks = [idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in picks]
    return torch.stack(picks, 1).flatten()          # (per_class * classes,): class 0, 1, ..., 9, 0, 1, ...


# --- Augmentation and loaders: batched tensor ops on the device -----------------------------------
@dataclass
class Augment:
    """Batched augmentation on normalised float tensors: a horizontal flip with probability `flip`,
    a random crop after zero padding by `crop_pad`, a rotation uniform in [-rotate_deg, rotate_deg]
    with probability `rotate_p`; 0 switches a part off."""
    flip: float = 0.5
    crop_pad: int = 0
    rotate_deg: float = 10.0
    rotate_p: float = 0.1

    def draw(self, n, generator):
        """The random choices for n images, drawn on the CPU: a seed augments alike on every device."""
        g = generator
        flip = torch.rand(n, generator=g) < self.flip
        shift = torch.randint(-self.crop_pad, self.crop_pad + 1, (n, 2), generator=g)
        angle = (torch.rand(n, generator=g) * 2 - 1) * self.rotate_deg
        angle = torch.where(torch.rand(n, generator=g) < self.rotate_p, angle, torch.zeros(n))
        return flip, shift, angle

    def apply(self, x, flip, shift, angle):
        if self.flip > 0:
            x = hflip(x, flip)
        if self.rotate_deg > 0 and self.rotate_p > 0:
            x = rotate(x, angle)
        if self.crop_pad > 0:
            x = translate(x, shift, self.crop_pad)
        return x


def hflip(x, mask):
    """Mirror the images where mask (N,) is True."""
    return torch.where(mask.view(-1, 1, 1, 1), x.flip(3), x)


def translate(x, shift, pad):
    """Random crop with zero padding as one gather: image i moves by shift[i] = (dy, dx), |d| <= pad."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (pad - shift[:, 0, None] + torch.arange(h, device=x.device))       # (N, H)
    cols = (pad - shift[:, 1, None] + torch.arange(w, device=x.device))       # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]   # (N, H, W, C)
    out = out.permute(0, 3, 1, 2)                          # (N, C, H, W), channels_last in memory
    return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()


def rotate(x, degrees):
    """Rotate image i by degrees[i] about its centre (bilinear, zero fill), all in one call."""
    theta = torch.deg2rad(degrees.to(x.dtype))
    cos, sin, zero = theta.cos(), theta.sin(), torch.zeros_like(theta)
    affine = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(affine, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Loader:
    """Seeded, shuffled, batched-augmented batches from one normalised float tensor on `device`."""

    def __init__(self, images, labels, mean, std, batch_size=128, shuffle=False, augment=None,
                 seed=0, device="cpu", channels_last=False):
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(f"Loader expects uint8 images shaped (N, 3, 32, 32), got "
                             f"{images.dtype} {tuple(images.shape)}: resize other images to 32x32 first")
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

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self):
        n, bs = len(self.labels), self.batch_size
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        if self.augment is not None:
            choices = [t.to(self.device, non_blocking=True) for t in self.augment.draw(n, self.generator)]
        if order is not None:
            order = order.to(self.device, non_blocking=True)
        for start in range(0, n, bs):
            idx = slice(start, start + bs) if order is None else order[start:start + bs]
            x, y = self.images[idx], self.labels[idx]
            if self.augment is not None:
                x = self.augment.apply(x, *(t[start:start + bs] for t in choices))
            yield x, y


def make_loaders(data, recipe, device, seed=1, train_subset=None, test_subset=None, test_batch_size=None):
    """Train and test loaders normalised by the (subset) training images; only train shuffles, augments."""
    train_x, train_y = subset(data.train_images, data.train_labels, train_subset, seed)
    test_x, test_y = subset(data.test_images, data.test_labels, test_subset, seed)
    mean, std = channel_mean_std(train_x)
    # channels_last, like Recipe.make_model's weights: faster convolutions on CPU and GPU, same numbers
    common = dict(mean=mean, std=std, batch_size=recipe.batch_size, device=device, channels_last=True)
    train = Loader(train_x, train_y, shuffle=True, augment=recipe.augment, seed=seed, **common)
    test = Loader(test_x, test_y, **dict(common, batch_size=test_batch_size or recipe.batch_size))
    return train, test


def unaugmented(loader):
    """The loader's images in order, unaugmented: train accuracy measured the way test accuracy is."""
    plain = Loader.__new__(Loader)
    plain.__dict__.update(loader.__dict__, augment=None, shuffle=False)
    return plain


# --- The recipe, and the device it trains on ------------------------------------------------------
@dataclass
class Recipe:
    """How a network is trained, in one place: the one recipe all three notebooks train (recipe_for)."""
    build: str = "separable-ws-skips"   # model.BUILDS name
    groups: int = 8               # GroupNorm's group count; the other norms ignore it
    init: str = "default"         # model.INITS: PyTorch's default init, or "he" (model.init_weights)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05              # peak learning rate of the one-cycle schedule
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norms: bool = False     # weight decay on the norms' scale and shift too
    warmup: float = 0.25          # fraction of steps spent rising to the peak
    ema: float = 0.999            # per-step decay of a moving average of the weights (and BatchNorm's
                                  # statistics) that the model takes before the last test; 0: none
    augment: Augment = field(default_factory=Augment)

    def make_model(self, norm):
        # channels_last weights, like make_loaders' images: faster on CPU and GPU, same numbers
        net = Net(norm, groups=self.groups, build=self.build, init=self.init)
        return net.to(memory_format=torch.channels_last)


def recipe_for(norm):
    """The recipe a norm's notebook trains: the same for every norm, so that only the norm differs."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(map(repr, NORMS))}")
    return Recipe()


def set_seed(seed):
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device():
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)" if device.type == "cpu" else device.type


def computes_bf16(device):
    """Whether training on `device` runs in bf16 autocast: on a CUDA GPU with bf16 arithmetic (compute
    capability 8.0 on: A100, L4, H100). Older GPUs such as the T4 of Colab's free tier only emulate
    bf16, and cuDNN has no bf16 convolutions for them, so they stay in fp32 like the CPU."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def autocast(device):
    """bf16 autocast where computes_bf16 (norms and the loss stay in fp32); plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=computes_bf16(device))


# --- Training and evaluation ----------------------------------------------------------------------
def make_sgd(model, recipe, lr):
    """The recipe's SGD (Nesterov momentum, weight decay) at a constant lr. With recipe.decay_norms
    False the norms' scale and shift train without weight decay: decay would pull toward zero how
    strongly each channel speaks, while on a conv before a norm it only changes the step size."""
    params = [p for p in model.parameters() if p.requires_grad]
    spared = set() if recipe.decay_norms else {
        id(p) for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))
        for p in m.parameters(recurse=False)}
    if spared:
        params = [dict(params=[p for p in params if id(p) not in spared]),
                  dict(params=[p for p in params if id(p) in spared], weight_decay=0.0)]
    return torch.optim.SGD(params, lr=lr, momentum=recipe.momentum,
                           nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)


def make_optimizer(model, recipe, steps_per_epoch):
    """make_sgd with a one-cycle lr per batch, momentum held at recipe.momentum."""
    opt = make_sgd(model, recipe, recipe.lr)
    # One step more than the batches, so that the step after the last batch stays inside the
    # schedule (OneCycleLR extrapolates past its end) and the reported final lr is the minimum.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch + 1,
        pct_start=recipe.warmup, anneal_strategy="linear", div_factor=10, final_div_factor=100,
        cycle_momentum=False)
    return opt, sched


def batch_loss(model, x, y):
    """(loss, log-probabilities) of model on the batch (x, y); the loss is not yet detached."""
    with autocast(x.device):
        log_probs = model(x)
    return F.nll_loss(log_probs.float(), y), log_probs


def train_step(model, x, y, optimizer):
    """One optimizer step on the batch (x, y); returns (loss, log-probabilities), loss not yet detached."""
    loss, log_probs = batch_loss(model, x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, log_probs


def train_epoch(model, loader, optimizer, scheduler=None, averaged=None):
    """One pass over loader; returns (mean loss, accuracy %). Sums stay on the device: one sync.
    `averaged` (torch's AveragedModel of model), if given, is updated after every step."""
    model.train()
    device = loader.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in loader:
        loss, log_probs = train_step(model, x, y, optimizer)
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
    with autocast(loader.device):
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
    """Train for recipe.epochs with one tqdm bar and one printed line per epoch; returns the history
    (per epoch: train/test loss and accuracy %, the lr at its end, its seconds). Train accuracy is the
    running figure over augmented batches. With recipe.ema,
    the last test is of the moving average of the weights (and BatchNorm's statistics)."""
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
        train_loss, train_acc = train_epoch(model, train_loader, optimizer, scheduler, averaged)
        if averaged is not None and epoch == recipe.epochs:
            model.load_state_dict(averaged.module.state_dict())
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


def misclassified(model, loader, n=10):
    """Indices, predicted and true labels of n test images the model gets wrong, one per true class
    in turn (a data set stored class by class would otherwise show errors of its first class)."""
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


# --- The learning-rate range test -----------------------------------------------------------------
LR_RANGE_STOP = 4.0          # the range test stops once its smoothed loss exceeds 4x its lowest
LR_RANGE_SMOOTHING = 0.98    # the decay of its moving average of the loss (about 50 steps)


def lr_range_test(model, loader, recipe, lr_min=1e-3, lr_max=10.0, steps=400, progress=True):
    """Leslie Smith's learning-rate range test: train `model` (pass a fresh one) with the recipe's SGD
    for up to `steps` batches, the lr growing geometrically from lr_min to lr_max, recording each
    step's loss; stop once the smoothed loss exceeds LR_RANGE_STOP x its minimum. Returns the curve and
    lr_at_min (lowest smoothed loss) and lr_steepest (fastest fall per decade of lr)."""
    if not 0 < lr_min < lr_max:
        raise ValueError(f"need 0 < lr_min < lr_max, got lr_min={lr_min}, lr_max={lr_max}")
    if steps < 3:
        raise ValueError(f"steps={steps}: the test needs at least 3 steps to read a slope")
    optimizer = make_sgd(model, recipe, lr_min)
    growth = (lr_max / lr_min) ** (1 / (steps - 1))                   # per step
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=growth)
    model.train()
    lrs, losses, smoothed = [], [], []
    average, lowest = 0.0, math.inf
    # the loader's epochs, one after another
    batches = (batch for _ in itertools.count() for batch in loader)
    bar = tqdm(total=steps, desc="lr range test", unit="step", disable=not progress,
               ascii=True, dynamic_ncols=False, ncols=100)
    for step, (x, y) in zip(range(steps), batches):
        lrs.append(scheduler.get_last_lr()[0])
        loss, _ = train_step(model, x, y, optimizer)
        scheduler.step()
        losses.append(loss.item())
        # an exponential moving average, debiased for its zero start (as fastai's finder does)
        average = LR_RANGE_SMOOTHING * average + (1 - LR_RANGE_SMOOTHING) * losses[-1]
        smoothed.append(average / (1 - LR_RANGE_SMOOTHING ** (step + 1)))
        bar.update()
        # refresh=False: redrawn at the bar's own pace, not at every step
        bar.set_postfix(lr=f"{lrs[-1]:.3g}", loss=f"{smoothed[-1]:.3f}", refresh=False)
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > LR_RANGE_STOP * lowest:
            break
        lowest = min(lowest, smoothed[-1])
    bar.close()
    lr_at_min, lr_steepest = read_lr_range(lrs, smoothed, span=round(1 / (1 - LR_RANGE_SMOOTHING)))
    return dict(lr=lrs, loss=losses, smoothed=smoothed, lr_at_min=lr_at_min, lr_steepest=lr_steepest,
                stopped_early=len(lrs) < steps)


def read_lr_range(lrs, smoothed, span):
    """(lr of the lowest smoothed loss, lr of its steepest fall before it), past the first `span` steps."""
    finite = np.nan_to_num(np.array(smoothed, dtype=float), nan=np.inf)
    at_min = int(np.argmin(finite))
    skip = min(span, at_min // 2)
    if at_min - skip < 2:                   # too few points to read a slope from
        return lrs[at_min], lrs[skip]
    slope = np.gradient(finite[skip:at_min + 1], np.log10(lrs[skip:at_min + 1]))
    return lrs[at_min], lrs[skip + int(np.argmin(slope))]


def lr_range_record(data, norm, recipe, device, seed=1, steps=400, lr_min=1e-3, lr_max=10.0,
                    train_subset=None, progress=True):
    """lr_range_test of a fresh, seeded network of `recipe` and `norm` on its own train loader, leaving
    torch's random state as it was (a notebook's training is the same with or without it); returns
    the result with what it ran, as benchmarks/lr_range.py writes it."""
    train_loader, _ = make_loaders(data, recipe, device, seed=seed, train_subset=train_subset, test_subset=1)
    start = time.perf_counter()
    # the init and dropout draw from torch's generators (CPU, and CUDA where that is the device)
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(seed)
        net = recipe.make_model(norm).to(device)
        result = lr_range_test(net, train_loader, recipe, lr_min=lr_min, lr_max=lr_max, steps=steps,
                               progress=progress)
    return dict(norm=norm, build=recipe.build, params=count_parameters(net),
                recipe_lr=recipe.lr, batch_size=recipe.batch_size, lr_min=lr_min, lr_max=lr_max, steps=steps,
                seed=seed, device=device_name(device), data=data.source,
                seconds=round(time.perf_counter() - start, 1), **result)


# --- The network's receptive field ----------------------------------------------------------------
def receptive_field(model, input_size=32):
    """Walk `model.layers` and return one row per layer: its kernel, stride and padding as the
    modules define them, the output size, the jump (input pixels between neighbouring outputs)
    and the receptive field. GAP pools every position, so the receptive field is read at C9."""
    rows, size, jump, rf = [], input_size, 1, 1
    for name, layer in model.layers.named_children():
        op = layer.conv if isinstance(layer, ConvBlock) else layer
        if isinstance(op, nn.Sequential):      # a separable block: its depthwise 3x3 sets the RF
            op = op[0]
        if isinstance(op, nn.AdaptiveAvgPool2d):
            rows.append(dict(layer=name, kernel="global", stride="-", padding="-", out=1, jump=jump, rf=rf))
            continue
        k, s, p = (v[0] if isinstance(v, tuple) else v for v in (op.kernel_size, op.stride, op.padding))
        size = (size + 2 * p - k) // s + 1
        rf += (k - 1) * jump
        jump *= s
        rows.append(dict(layer=name, kernel=k, stride=s, padding=p, out=size, jump=jump, rf=rf))
    return rows


def format_receptive_field(rows):
    """The receptive-field table as fixed-width text."""
    head = f"{'layer':<6}{'kernel':>7}{'stride':>7}{'pad':>5}{'out':>5}{'jump':>6}{'RF':>5}"
    return "\n".join([head] + [f"{r['layer']:<6}{r['kernel']!s:>7}{r['stride']!s:>7}{r['padding']!s:>5}"
                               f"{r['out']:>5}{r['jump']:>6}{r['rf']:>5}" for r in rows])


# --- Results files --------------------------------------------------------------------------------
def atomic_write(path, write, binary=False):
    """Write a file whole or not at all: into a temporary file beside it, then rename. The file
    gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
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


def save_json(path, obj):
    """Write obj as JSON, whole or not at all; returns obj."""
    atomic_write(path, lambda f: json.dump(obj, f, indent=1))
    return obj


def recipe_dict(recipe):
    return asdict(recipe)


def summarize(history):
    """The headline numbers of one run."""
    first70 = next((h["epoch"] for h in history if h["test_acc"] >= 70), None)
    last = history[-1]
    return dict(epochs=len(history), final_train_acc=last["train_acc"], final_test_acc=last["test_acc"],
                best_test_acc=max(h["test_acc"] for h in history), first_epoch_70=first70,
                seconds_per_epoch=round(sum(h["seconds"] for h in history) / len(history), 1))


def arm_label(run):
    """A why_normalise run's arm in words: its norm, and for no norm its init ('no norm, He init')."""
    init = {"he": "He init", "default": "default init"}[run["init"]]
    return NORMS[run["norm"]] + (f", {init}" if run["norm"] == "none" else "")


def arms_of(runs):
    """{arm_label: its runs} of benchmarks/why_normalise.py's runs, no norm first, then NORMS' order."""
    arms = {}
    for r in sorted(runs, key=lambda r: (r["norm"] != "none", list(NORMS).index(r["norm"]), r["init"])):
        arms.setdefault(arm_label(r), []).append(r)
    return arms


def lr_tolerance(runs):
    """benchmarks/why_normalise.py's runs per arm (arms_of): {lr: final test accuracies over the
    seeds}, the best lr by mean accuracy and its runs, and the largest lr at which every seed trained
    (ended above its threshold with finite losses; None if no lr did)."""
    table = {}
    for label, mine in arms_of(runs).items():
        finals = {lr: [r["final"] for r in mine if r["lr"] == lr] for lr in sorted({r["lr"] for r in mine})}
        trained = [lr for lr in finals if all(r["trained"] for r in mine if r["lr"] == lr)]
        best = max(finals, key=lambda lr: np.mean(finals[lr]))
        table[label] = dict(finals=finals, best=best, best_acc=float(np.mean(finals[best])),
                            at_best=[r for r in mine if r["lr"] == best],
                            largest_trained=max(trained, default=None), params=mine[0]["params"])
    return table


def figure_dir(quick):
    """doc/ for a full run; one reused scratch folder for a quick (CI) run, so doc/ is never touched."""
    folder = Path(tempfile.gettempdir()) / "s8-quick" if quick else Path("doc")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- Plots ----------------------------------------------------------------------------------------
def save_figure(fig, path):
    """Save with a fixed dpi and no software stamp, so reruns give the same bytes; whole or not at all."""
    if path is not None:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight",
                                                  metadata={"Software": None}), binary=True)
    return fig


def show_images(images, labels=None, classes=CLASSES, captions=None, nrows=4, ncols=8, path=None,
                title=None):
    """A grid of uint8 images (N, 3, H, W), captioned by class name, or by `captions` if given."""
    lines = max((str(c).count("\n") + 1 for c in captions), default=1) if captions is not None else 1
    height = (1.3 + 0.2 * lines) * nrows + (0.4 if title else 0)       # room for each caption's lines
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, height))
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
    return save_figure(fig, path)


def denormalize(x, mean, std):
    """Normalised float images back to uint8, for showing what the network sees."""
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def plot_history(history, title="", averaged_last=False, path=None):
    """Loss and accuracy per epoch, train and test; averaged_last marks the weight average's test."""
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, ms=3, label=split)
        ax_acc.plot(epochs, [h[f"{split}_acc"] for h in history], style, ms=3, label=split)
    if averaged_last:
        for ax, key in ((ax_acc, "test_acc"), (ax_loss, "test_loss")):
            ax.plot(epochs[-1], history[-1][key], "*", ms=12, color="C3", label="test, weight average")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title} loss".strip())
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title} accuracy".strip())
    ax_acc.axhline(70, color="grey", lw=0.8, ls="--")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def show_augmentations(images, augment, mean, std, seed=0, path=None):
    """Rows: the originals, each augmentation alone at full strength, then the recipe's own mix."""
    n = len(images)
    parts = {"original": Augment(flip=0, rotate_p=0),
             "flip": Augment(flip=1, rotate_p=0),
             f"rotate ±{augment.rotate_deg or 10:g}°": Augment(flip=0, rotate_deg=augment.rotate_deg or 10,
                                                            rotate_p=1),
             f"crop, pad {augment.crop_pad or 4}": Augment(flip=0, rotate_p=0,
                                                          crop_pad=augment.crop_pad or 4),
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


def plot_lr_range(records, path=None):
    """Range tests, one per norm: smoothed loss against lr, steepest fall, lowest point, the peak lr."""
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
    return save_figure(fig, path)

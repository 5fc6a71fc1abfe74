"""Data, training, evaluation, results files and plots for the S8 notebooks.

Sections: data (load_cifar10, channel_mean_std, Augment, Loader), training (Recipe, fit, the lr range
test), activations and gradients through depth, results files, plots. Every notebook calls these; nothing
here is notebook-specific. The report that fills README.md from the results files is benchmarks/report.py.
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

from model import NORMS, SPATIAL_BLOCKS, Net, count_parameters

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_SHAPE = (3, 32, 32)
SPLIT_SIZES = {"train": 50_000, "test": 10_000}     # CIFAR-10's, 5,000 and 1,000 per class
DATA_ENV = "S8_DATA"          # points load_cifar10 at a local copy
HOW_TO_PROVIDE = (f"Provide CIFAR-10 in one of these ways: let torchvision download it (needs internet), or set "
                  f"{DATA_ENV} (or pass source=) to (1) a folder holding torchvision's 'cifar-10-batches-py', (2) a "
                  f"folder with train/<class>/*.jpg and test/<class>/*.jpg, or (3) a .tar or .tar.gz of that layout.")


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
    the latter. Decoded tensors are cached in `data_dir/cache`, keyed by the path, size and mtime of
    every file the loader reads. full: check for 50,000 + 10,000 images, 5,000 and 1,000 per class
    (False loads a deliberately smaller copy)."""
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
    saved = None
    if cache.exists():
        try:
            saved = torch.load(cache, weights_only=True)
        except Exception:       # a broken cache is rebuilt, never trusted
            cache.unlink()
    if saved is None:
        splits, classes = _read_source(folder)
        saved = dict(train_images=splits["train"][0], train_labels=splits["train"][1],
                     test_images=splits["test"][0], test_labels=splits["test"][1], classes=tuple(classes))
        _atomic_write(cache, lambda f: torch.save(saved, f), binary=True)
    data = CIFAR10(**saved, source=label)
    if full:
        _check_sizes(data, label)
    return data


def _check_sizes(data, where):
    for split, labels in (("train", data.train_labels), ("test", data.test_labels)):
        per_class = torch.bincount(labels, minlength=len(CLASSES)).tolist()
        expected = SPLIT_SIZES[split] // len(CLASSES)
        if len(labels) != SPLIT_SIZES[split] or any(n != expected for n in per_class):
            raise RuntimeError(
                f"{where}: the {split} split has {len(labels):,} images ({per_class} per class); CIFAR-10 has "
                f"{SPLIT_SIZES[split]:,}, {expected:,} per class. The copy is incomplete: fetch it again "
                f"(or pass full=False to load a deliberately smaller set). {HOW_TO_PROVIDE}")


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
    """The path, size and mtime of every file of a source: any added, removed or rewritten file changes it."""
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
        return _read_pickles(pickles)
    if (path / "train").is_dir() and (path / "test").is_dir():
        files = ((p.relative_to(path).parts, p.read_bytes) for p in sorted(path.glob("*/*/*")) if p.is_file())
        return _decode_image_files(files, str(path))
    raise RuntimeError(f"{str(path)!r} holds neither 'cifar-10-batches-py' nor train/ and test/ "
                       f"folders. {HOW_TO_PROVIDE}")


def _check_gzip(path):
    """Read a .gz to its end, so that gzip checks its CRC and length (tarfile stops at the end marker)."""
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
                why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "it", str(e))
                raise RuntimeError(f"{where}: cannot decode {name} ({why}). Replace the file or fetch the "
                                   f"copy again. {HOW_TO_PROVIDE}") from None
            if tuple(img.shape) != IMAGE_SHAPE:
                raise RuntimeError(f"{where}: {name} is {img.shape[2]}x{img.shape[1]} pixels; CIFAR-10 "
                                   f"images are 32x32. Point {DATA_ENV} at an unresized copy.")
            images[i], labels[i] = img, CLASSES.index(cls)
        splits[split] = (images, labels)
    return splits, list(CLASSES)


def decode_rgb(data):
    """One image file's bytes (JPEG, PNG, ...) as uint8 RGB pixels (3, H, W), decoded by Pillow."""
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
    """Indices of `per_class` random images of each class, in turns of one per class (a grid row each)."""
    g = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(labels == c).flatten() for c in range(len(CLASSES))]
    picks = [idx[torch.randperm(len(idx), generator=g)[:per_class]] for idx in picks]
    return torch.stack(picks, 1).flatten()          # (per_class * classes,): class 0, 1, ..., 9, 0, 1, ...


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


@dataclass
class Recipe:
    """How a network is trained, in one place: the one recipe all three notebooks train (recipe_for)."""
    build: str = "separable-ws-skips"   # model.BUILDS name
    groups: int = 8               # GroupNorm's group count; the other norms ignore it
    dropout: float = None         # None: the build's own (0.02)
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05              # peak learning rate of the one-cycle schedule
    momentum: float = 0.9
    momentum_swing: float = 0.0   # > 0: one-cycle moves momentum against the lr within momentum +- swing
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norms: bool = False     # weight decay on the norms' scale and shift too
    label_smoothing: float = 0.0
    warmup: float = 0.25          # fraction of steps spent rising to the peak
    whiten_c1: bool = False       # start C1's filters from the training patches' whitening (whiten_init)
    ema: float = 0.999            # per-step decay of a moving average of the weights (and BatchNorm's
                                  # statistics) that the model takes before the last test; 0: none
    augment: Augment = field(default_factory=Augment)

    def make_model(self, norm):
        extra = {} if self.dropout is None else {"dropout": self.dropout}
        # channels_last weights, like make_loaders' images: faster on CPU and GPU, same numbers
        return Net(norm, groups=self.groups, build=self.build, **extra).to(memory_format=torch.channels_last)


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


def make_sgd(model, recipe, lr):
    """The recipe's SGD; with decay_norms False the norms' scale and shift get no weight decay."""
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
    """make_sgd with a one-cycle lr per batch; momentum swings within momentum +- momentum_swing."""
    opt = make_sgd(model, recipe, recipe.lr)
    # One step more than the batches, so that the step after the last batch stays inside the
    # schedule (OneCycleLR extrapolates past its end) and the reported final lr is the minimum.
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch + 1,
        pct_start=recipe.warmup, anneal_strategy="linear", div_factor=10, final_div_factor=100,
        cycle_momentum=recipe.momentum_swing > 0,
        base_momentum=round(recipe.momentum - recipe.momentum_swing, 10),
        max_momentum=round(recipe.momentum + recipe.momentum_swing, 10))
    return opt, sched


@torch.no_grad()
def whiten_init(conv, images, n=2000, eps=5e-4):
    """Start a conv's filters as a whitening of its input patches (cifar10-airbench): for the leading
    eigenvectors e_i of the covariance of k x k patches of n `images`, filter pairs +-e_i/sqrt(lambda_i),
    so C1 starts out passing the images' strongest patterns, decorrelated and at equal scale."""
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
    """Whether `device` trains in bf16 autocast: CUDA with bf16 arithmetic (A100, L4, H100; no T4)."""
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


def train_step(model, x, y, optimizer, label_smoothing=0.0):
    """One optimizer step on the batch (x, y); returns (loss, log-probabilities), loss not yet detached."""
    loss, log_probs = batch_loss(model, x, y, label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, log_probs


def train_epoch(model, loader, optimizer, scheduler=None, label_smoothing=0.0, averaged=None):
    """One pass over loader, updating `averaged` (an AveragedModel) each step; (mean loss, accuracy %)."""
    model.train()
    device = loader.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in loader:
        loss, log_probs = train_step(model, x, y, optimizer, label_smoothing)
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
    """Train for recipe.epochs with one tqdm bar and one printed line per epoch; returns the history
    (per epoch: train/test loss and accuracy %, the lr at its end, its seconds). Train accuracy is the
    running figure over augmented batches. With recipe.whiten_c1, C1 starts whitened; with recipe.ema,
    the last test is of the moving average of the weights (and BatchNorm's statistics)."""
    if recipe.whiten_c1:
        whiten_init(model.layers.C1.conv, train_loader.images)
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
                                            recipe.label_smoothing, averaged)
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


def lr_range_test(model, loader, recipe, lr_min=1e-3, lr_max=10.0, steps=400, stop_factor=4.0,
                  smoothing=0.98, progress=True):
    """Leslie Smith's learning-rate range test: train `model` (pass a fresh one) with the recipe's SGD
    for up to `steps` batches, the lr growing geometrically from lr_min to lr_max, recording each
    step's loss; stop once the smoothed loss exceeds stop_factor x its minimum. Returns the curve and
    lr_at_min (lowest smoothed loss) and lr_steepest (fastest fall per decade of lr)."""
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
        if recipe.whiten_c1:      # the network starts as fit starts it
            whiten_init(net.layers.C1.conv, train_loader.images)
        result = lr_range_test(net, train_loader, recipe, lr_min=lr_min, lr_max=lr_max, steps=steps,
                               progress=progress)
    return dict(norm=norm, build=recipe.build, params=count_parameters(net),
                recipe_lr=recipe.lr, batch_size=recipe.batch_size, lr_min=lr_min, lr_max=lr_max, steps=steps,
                seed=seed, device=device_name(device), data=data.source,
                seconds=round(time.perf_counter() - start, 1), **result)


def make_loaders(data, recipe, device, seed=1, train_subset=None, test_subset=None,
                 channels_last=True, test_batch_size=None):
    """Train and test loaders normalised by the (subset) training images; only train shuffles, augments."""
    train_x, train_y = subset(data.train_images, data.train_labels, train_subset, seed)
    test_x, test_y = subset(data.test_images, data.test_labels, test_subset, seed)
    mean, std = channel_mean_std(train_x)
    common = dict(mean=mean, std=std, batch_size=recipe.batch_size, device=device,
                  channels_last=channels_last)
    train = Loader(train_x, train_y, shuffle=True, augment=recipe.augment, seed=seed, **common)
    test = Loader(test_x, test_y, **dict(common, batch_size=test_batch_size or recipe.batch_size))
    return train, test


def unaugmented(loader):
    """The loader's images in order, unaugmented: train accuracy measured the way test accuracy is."""
    plain = Loader.__new__(Loader)
    plain.__dict__.update(loader.__dict__, augment=None, shuffle=False)
    return plain


def misclassified(model, loader, n=10):
    """Indices, predicted and true labels of n misclassified images, one per true class in turn."""
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


def depth_stats(model, x, y):
    """Per 3x3 block (C1 ... C9) on one batch: the std of the block's output (a forward hook) and the
    norm of the loss's gradient for the block's conv weights (hooks run as each gradient is accumulated).
    One forward and backward pass in train mode, no step (BatchNorm's running averages do take the batch in)."""
    act_std, grad_sq, handles = {}, dict.fromkeys(SPATIAL_BLOCKS, 0.0), []
    for name in SPATIAL_BLOCKS:
        block = getattr(model.layers, name)
        handles.append(block.register_forward_hook(
            lambda _m, _inp, out, name=name: act_std.__setitem__(name, out.detach().float().std().item())))
        handles += [p.register_post_accumulate_grad_hook(
            lambda p, name=name: grad_sq.__setitem__(name, grad_sq[name] + p.grad.float().pow(2).sum().item()))
            for p in block.conv.parameters()]
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        loss, _ = batch_loss(model, x, y)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return dict(blocks=list(SPATIAL_BLOCKS), act_std=[act_std[n] for n in SPATIAL_BLOCKS],
                grad_norm=[math.sqrt(grad_sq[n]) for n in SPATIAL_BLOCKS], loss=loss.item())


def _atomic_write(path, write, binary=False):
    """Write a file whole or not at all (temporary file, then rename), permissions 0666 less the umask."""
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


def save_json(path, obj, indent=1):
    """Write obj as JSON, whole or not at all; returns obj."""
    _atomic_write(path, lambda f: json.dump(obj, f, indent=indent))
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


def figure_dir(quick):
    """doc/ for a full run; one reused scratch folder for a quick (CI) run, so doc/ is never touched."""
    folder = Path(tempfile.gettempdir()) / "s8-quick" if quick else Path("doc")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _finish(fig, path):
    """Save with a fixed dpi and no software stamp, so reruns give the same bytes; whole or not at all."""
    if path is not None:
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight",
                                                  metadata={"Software": None}), binary=True)
    return fig


def show_images(images, labels=None, classes=CLASSES, captions=None, nrows=4, ncols=8, path=None,
                title=None):
    """A grid of uint8 images (N, 3, H, W), captioned by class name, or by `captions` if given."""
    lines = max((str(c).count("\n") + 1 for c in captions), default=1) if captions is not None else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, (1.3 + 0.2 * lines) * nrows + (0.4 if title else 0)))
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


def plot_history(history, title="", averaged_last=False, path=None):
    """Loss and accuracy per epoch, train and test; averaged_last marks the weight average's test."""
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split, style in (("train", "-o"), ("test", "-s")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, ms=3, label=split)
        ax_acc.plot(epochs, [h[f"{split}_acc"] for h in history], style, ms=3, label=split)
    if averaged_last:
        ax_acc.plot(epochs[-1], history[-1]["test_acc"], "*", ms=12, color="C3", label="test, weight average")
        ax_loss.plot(epochs[-1], history[-1]["test_loss"], "*", ms=12, color="C3", label="test, weight average")
    ax_loss.set(xlabel="epoch", ylabel="loss", title=f"{title} loss".strip())
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title} accuracy".strip())
    ax_acc.axhline(70, color="grey", lw=0.8, ls="--")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _finish(fig, path)


def plot_depth(record, path=None):
    """Two panels from benchmarks/why_normalise.py's record: each 3x3 block's output std and weight
    gradient norm, a line per norm (mean over seeds), dashed at initialisation, solid trained; log scale."""
    shown = {}
    for norm in record["norms"]:
        # the recipe's peak lr, unless every run there stayed at chance: then the lower lr it was rerun at
        at_peak = [r for r in record["runs"] if r["norm"] == norm and r["lr"] == record["recipe_lr"]]
        lower = [r for r in record["runs"] if r["norm"] == norm and r["lr"] != record["recipe_lr"]]
        shown[norm] = lower if lower and all(r["at_chance"] for r in at_peak) else at_peak
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for (key, label), ax in zip((("act_std", "std of the block's output"),
                                 ("grad_norm", "gradient norm of the block's conv weights")), axes):
        for k, (norm, runs) in enumerate(shown.items()):
            for when, style in (("init", "--"), ("trained", "-o")):
                y = np.mean([r[when][key] for r in runs], axis=0)
                off = "" if (y > 0).any() else f" ({'NaN' if np.isnan(y).any() else 'zero'}: off the log scale)"
                ax.plot(record["blocks"], y, style, color=f"C{k}", ms=3,
                        label=f"{NORMS[norm]}, {'at init' if when == 'init' else 'trained'}{off}")
        ax.set(yscale="log", xlabel="block (input side to output side)", ylabel=label, title=label)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _finish(fig, path)


def show_augmentations(images, augment, mean, std, seed=0, path=None):
    """Rows: the originals, each augmentation alone at full strength, then the recipe's own mix."""
    n = len(images)
    parts = {"original": Augment(flip=0, rotate_p=0),
             "flip": Augment(flip=1, rotate_p=0),
             f"rotate ±{augment.rotate_deg or 10:g}°": Augment(flip=0, rotate_deg=augment.rotate_deg or 10,
                                                            rotate_p=1),
             f"crop, pad {augment.crop_pad or 4}": Augment(flip=0, rotate_p=0, crop_pad=augment.crop_pad or 4),
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
    return _finish(fig, path)


def plot_norm_methods(path=None):
    """Which entries of an (N, C, H*W) activation each norm pools one mean and variance over."""
    n, c, hw, groups = 4, 6, 4, 3
    chosen = {
        "BatchNorm": lambda i, j: j == 0,                        # one channel, all samples
        "LayerNorm": lambda i, j: i == 0,                        # one sample, all channels
        "GroupNorm": lambda i, j: i == 0 and j < c // groups,    # one sample, one group of channels
    }
    fig = plt.figure(figsize=(12, 4.2))
    for k, (name, picks) in enumerate(chosen.items()):
        ax = fig.add_subplot(1, 3, k + 1, projection="3d")
        colors = np.empty((n, c, hw), dtype=object)
        for i, j in itertools.product(range(n), range(c)):
            colors[i, j, :] = "#4a90d9" if picks(i, j) else "#eeeeee"
        ax.voxels(np.ones((n, c, hw), dtype=bool), facecolors=colors, edgecolors="#555555", linewidth=0.4)
        ax.set(xlabel="N (samples)", ylabel="C (channels)", xticks=[], yticks=[], zticks=[])
        ax.set_zlabel("H, W", labelpad=-4)
        ax.view_init(elev=20, azim=-60)
        ax.set_box_aspect(None, zoom=0.8)          # room for the axis labels inside the panel
        ax.set_title(name, fontsize=13)
    fig.suptitle("Blue: the values that share one mean and variance", fontsize=11, y=1.02)
    fig.tight_layout()
    return _finish(fig, path)

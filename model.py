"""The CIFAR-10 network of this course, in the squeeze-and-expand layout

    C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10

`C` is a 3x3 conv block (conv -> norm -> ReLU -> dropout), `c` a 1x1 "squeeze" conv block, `P`
2x2 max-pooling, `GAP` global average pooling, c10 the 1x1 classifier. One `Net` serves every norm:
Net("bn") is the assignment's network (46,064 parameters), Net("gn", groups=8,
build="separable-ws-skips") the notebooks' (49,920), Net("none") the same without any norm (a conv
bias in place of the norm's shift). `init` picks the starting weights: PyTorch's default, or He's
(init_weights). This file holds modules only; training lives in utils.py.
"""
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

NORMS = {"bn": "BatchNorm", "ln": "LayerNorm", "gn": "GroupNorm", "none": "no norm"}
INITS = ("default", "he")     # PyTorch's own init, or He et al. 2015's (init_weights)

# The 10 widths are the output channels of C1 C2 c3 C3 C4 C5 c6 C7 C8 C9, in order.
BLOCK_NAMES = ("C1", "C2", "c3", "C3", "C4", "C5", "c6", "C7", "C8", "C9")
SPATIAL_BLOCKS = tuple(n for n in BLOCK_NAMES if n[0] == "C")     # the 3x3 blocks


@dataclass(frozen=True)
class Build:
    """Everything that shapes the network besides its norm."""
    widths: tuple = (16, 32, 16, 32, 32, 32, 16, 16, 32, 32)
    dropout: float = 0.02      # after every ReLU
    skips: bool = False        # x + block(x) around every block whose input and output shapes match
    separable: tuple = ()      # names of 3x3 blocks built as depthwise 3x3 + pointwise 1x1
    weight_standardization: bool = False   # each filter of a mixing conv used at zero mean, unit variance


BUILDS = {
    # The assignment's network, layer for layer: 46,064 parameters with a norm, receptive field 44.
    "reference": Build(),
    # The notebooks' build: C1 and C2 as in the reference, every later 3x3 block depthwise-separable,
    # which buys 2-3.5x the width at 16x16 and 8x8 for the same budget, and free additive skips
    # around c3, C4 and C5. 49,920 parameters, receptive field 44.
    "separable-skips": Build(widths=(16, 32, 32, 64, 64, 64, 48, 96, 96, 112), skips=True,
                             separable=("C3", "C4", "C5", "C7", "C8", "C9")),
}
# The same with weight standardization (Qiao et al. 2019) on every conv that mixes channels.
BUILDS["separable-ws-skips"] = replace(BUILDS["separable-skips"], weight_standardization=True)


class StdConv2d(nn.Conv2d):
    """A conv that uses each output filter of its weight at zero mean and unit variance (weight
    standardization); it trains the raw weight. torch has no such layer; timm's is the same."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias)


class LayerNorm2d(nn.GroupNorm):
    """LayerNorm for conv features, over all of (C, H, W) of each sample: GroupNorm with one group. Its
    scale and shift are per channel (2*C parameters, like BatchNorm's), so it takes any spatial size;
    `nn.LayerNorm([C, H, W])` would learn 2*C*H*W of them and accept only one size."""

    def __init__(self, num_channels, eps=1e-5):
        super().__init__(1, num_channels, eps=eps)


def check_groups(groups, widths):
    """GroupNorm needs a group count that divides the width of every block."""
    if groups >= 1 and all(w % groups == 0 for w in widths):
        return
    valid = [g for g in range(1, min(widths) + 1) if all(w % g == 0 for w in widths)]
    raise ValueError(f"GroupNorm: groups={groups} does not divide every block's width {tuple(widths)}. "
                     f"Choose groups from {valid}: each divides all of them.")


def make_norm(norm, channels, groups):
    """The normalisation layer of one block ("none": an identity, no parameters)."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "ln":
        return LayerNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(groups, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}: choose one of "
                     + ", ".join(f"{k!r} ({v})" for k, v in NORMS.items()))


class ConvBlock(nn.Module):
    """conv -> norm -> ReLU -> dropout, with an additive skip where the shapes allow. The conv has a
    bias only without a norm: a norm subtracts the mean, so a bias before it would do nothing, and
    its shift takes the bias's place."""

    def __init__(self, c_in, c_out, kernel_size, padding, norm, groups, dropout, skip,
                 separable=False, weight_standardization=False):
        super().__init__()
        # standardize only the convs that mix channels: a 9-weight depthwise filter at zero mean
        # could only detect edges
        mixing = StdConv2d if weight_standardization else nn.Conv2d
        bias = norm == "none"
        if separable and kernel_size > 1:
            # a 3x3 filter per input channel, then a 1x1 mix: 9*c_in + c_in*c_out weights
            self.conv = nn.Sequential(
                nn.Conv2d(c_in, c_in, kernel_size, padding=padding, groups=c_in, bias=False),
                mixing(c_in, c_out, 1, bias=bias))
        else:
            self.conv = mixing(c_in, c_out, kernel_size, padding=padding, bias=bias)
        self.norm = make_norm(norm, c_out, groups)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.skip = skip and c_in == c_out and kernel_size == 2 * padding + 1

    def forward(self, x):
        y = self.drop(self.relu(self.norm(self.conv(x))))
        return x + y if self.skip else y


class Net(nn.Module):
    """C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10, returning log-probabilities (for NLL loss).

    norm:   "bn" (BatchNorm), "ln" (LayerNorm over C,H,W), "gn" (GroupNorm) or "none"
    groups: GroupNorm's group count; must divide every width (ignored by the other norms)
    build:  a name in BUILDS; `overrides` replace single fields of it, e.g. dropout=0.1
    init:   "default" (PyTorch's) or "he" (init_weights)
    """

    def __init__(self, norm="bn", groups=4, build="reference", init="default", **overrides):
        super().__init__()
        if build not in BUILDS:
            raise ValueError(f"unknown build {build!r}: choose one of {sorted(BUILDS)}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: choose one of {', '.join(map(repr, INITS))}")
        make_norm(norm, 1, 1)                          # an unknown norm fails here, before any layer
        cfg = replace(BUILDS[build], **overrides)
        if len(cfg.widths) != len(BLOCK_NAMES):
            raise ValueError(f"widths needs {len(BLOCK_NAMES)} numbers ({' '.join(BLOCK_NAMES)}), "
                             f"got {len(cfg.widths)}")
        if norm == "gn":
            check_groups(groups, cfg.widths)
        self.norm_name, self.groups, self.build, self.init, self.cfg = norm, groups, build, init, cfg
        w = dict(zip(BLOCK_NAMES, cfg.widths))

        def block(name, c_in, kernel_size, padding):
            return ConvBlock(c_in, w[name], kernel_size, padding, norm, groups, cfg.dropout, cfg.skips,
                             name in cfg.separable, cfg.weight_standardization)

        self.min_size = 20        # two 2x2 pools, then C8 and C9 each take 2 pixels: 4 * (1 + 4)
        self.layers = nn.Sequential(OrderedDict([
            ("C1", block("C1", 3, 3, 1)),             # (N, C1, 32, 32)
            ("C2", block("C2", w["C1"], 3, 1)),       # (N, C2, 32, 32)
            ("c3", block("c3", w["C2"], 1, 0)),       # (N, c3, 32, 32)  squeeze
            ("P1", nn.MaxPool2d(2)),                  # (N, c3, 16, 16)
            ("C3", block("C3", w["c3"], 3, 1)),       # (N, C3, 16, 16)
            ("C4", block("C4", w["C3"], 3, 1)),       # (N, C4, 16, 16)
            ("C5", block("C5", w["C4"], 3, 1)),       # (N, C5, 16, 16)
            ("c6", block("c6", w["C5"], 1, 0)),       # (N, c6, 16, 16)  squeeze
            ("P2", nn.MaxPool2d(2)),                  # (N, c6, 8, 8)
            ("C7", block("C7", w["c6"], 3, 1)),       # (N, C7, 8, 8)
            ("C8", block("C8", w["C7"], 3, 0)),       # (N, C8, 6, 6)
            ("C9", block("C9", w["C8"], 3, 0)),       # (N, C9, 4, 4)
            ("GAP", nn.AdaptiveAvgPool2d(1)),         # (N, C9, 1, 1)
            ("c10", nn.Conv2d(w["C9"], 10, 1, bias=False)),  # (N, 10, 1, 1)
        ]))
        if init == "he":
            init_weights(self)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Net expects a batch of RGB images shaped (N, 3, H, W), got {tuple(x.shape)}")
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(f"Net needs images of at least {self.min_size}x{self.min_size} pixels (two 2x2 "
                             f"poolings, then C8 and C9), got {x.shape[2]}x{x.shape[3]}: resize them first, "
                             f"e.g. with torchvision.transforms.Resize(32) (CIFAR-10's size)")
        x = self.layers(x).flatten(1)       # (N, 10)
        return F.log_softmax(x, dim=1)      # log-probabilities


@torch.no_grad()
def init_weights(model):
    """He et al. 2015's init (normal, fan_in): a conv followed by a ReLU gets variance 2/fan_in, which
    keeps the spread of the signal from block to block; a depthwise 3x3 (no ReLU before its pointwise
    conv) and the classifier c10 (none after it) get 1/fan_in. Biases start at 0. PyTorch's default,
    variance 1/(3 fan_in), shrinks the signal by a constant factor per block, which a norm undoes and
    a network without one does not."""
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        before_relu = m.groups == 1 and not name.startswith("layers.c10")
        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu" if before_relu else "linear")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

"""The CIFAR-10 network of this course, in the squeeze-and-expand layout

    C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10

`C` is a 3x3 conv block (conv -> norm -> ReLU -> dropout), `c` a 1x1 "squeeze"
conv block, `P` 2x2 max-pooling and `GAP` global average pooling; c10 is the
1x1 classifier. One `Net` class serves all three normalisations:

    Net("bn")                       # the seed's reference build, 46,064 parameters
    Net("gn", groups=4)             # same widths, GroupNorm with 4 groups
    Net("ln", build="separable")    # the notebooks' build, 49,920 parameters (see BUILDS)

This file holds modules only; training lives in utils.py.
"""
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

NORMS = {"bn": "BatchNorm", "ln": "LayerNorm", "gn": "GroupNorm"}

# The 10 widths are the output channels of C1 C2 c3 C3 C4 C5 c6 C7 C8 C9, in order.
BLOCK_NAMES = ("C1", "C2", "c3", "C3", "C4", "C5", "c6", "C7", "C8", "C9")
SPATIAL_BLOCKS = tuple(n for n in BLOCK_NAMES if n[0] == "C")     # the 3x3 blocks
SQUEEZE_BLOCKS = tuple(n for n in BLOCK_NAMES if n[0] == "c")     # the 1x1 squeezes c3 and c6


@dataclass(frozen=True)
class Build:
    """Everything that shapes the network besides its norm."""
    widths: tuple = (16, 32, 16, 32, 32, 32, 16, 16, 32, 32)
    dropout: float = 0.02      # after every ReLU
    tail_padding: int = 0      # padding of C8 and C9: 0 shrinks 8x8 -> 6x6 -> 4x4 as in the seed
    skips: bool = False        # x + block(x) around every block (3x3 or 1x1) whose input and output shapes match
    separable: tuple = ()      # names of 3x3 blocks built as depthwise 3x3 + pointwise 1x1
    weight_standardization: bool = False   # each filter of a conv scaled to zero mean, unit variance
    linear_squeeze: bool = False  # c3 and c6 end at their norm (no ReLU, no dropout), as MobileNetV2's
                                  # linear bottlenecks: a ReLU in the squeezed space discards features
    depthwise_norm: bool = False  # separable blocks as MobileNet v1's: depthwise 3x3 -> norm -> ReLU ->
                                  # pointwise 1x1 -> norm -> ReLU, twice the nonlinear depth; False: the
                                  # two convs compose into one linear map (Xception's choice)
    pointwise_groups: int = 1     # separable blocks' 1x1 mix split into this many groups, each mixing only
                                  # its share of the channels (ShuffleNet): 1/groups of the weights, so more
                                  # width for the budget; a channel shuffle before it lets groups trade


BUILDS = {
    # The seed network, layer for layer: 46,064 parameters with BatchNorm, receptive field 44.
    "reference": Build(),
    # Trial "wc+tail+skips" of doc/trials.md: a thinner 32x32 stage, a wider 8x8 stage that
    # stays 8x8 (C8/C9 padded), additive skips, no dropout. 49,660 parameters. It did not beat
    # the reference build in 20 epochs (see the trials), so the notebooks train "reference".
    "wide-tail": Build(widths=(12, 24, 16, 32, 32, 32, 16, 24, 32, 40), dropout=0.0,
                       tail_padding=1, skips=True),
    # The notebooks' build: C1 and C2 (32x32) as in the seed, every later 3x3 block
    # depthwise-separable, which buys 2-3.5x the width at 16x16 and 8x8 for the same budget.
    # 49,920 parameters, receptive field 44. Trial "s1 sep-low" of doc/trials.md.
    "separable": Build(widths=(16, 32, 32, 64, 64, 64, 48, 96, 96, 112),
                       separable=("C3", "C4", "C5", "C7", "C8", "C9")),
}
# The separable build with weight standardization (Qiao et al. 2019), said to help GroupNorm
# and LayerNorm most: every conv that mixes channels standardises each of its filters.
BUILDS["separable-ws"] = replace(BUILDS["separable"], weight_standardization=True)
# The separable build with width moved from the 8x8 stage to the 16x16 stage, where the same
# parameters do four times the compute: 49,488 parameters, about 20% more multiply-adds. One
# BatchNorm trial (doc/trials.md): it fit the training set better and tested no better; not adopted.
BUILDS["separable-wide16"] = replace(BUILDS["separable"], widths=(16, 32, 48, 80, 80, 80, 48, 80, 80, 80))
# The separable build with additive skips wherever a block keeps its input's shape (c3, C4, C5):
# no extra parameters. First one BatchNorm trial (doc/trials.md); now the build of the BatchNorm and
# GroupNorm notebooks (doc/tuning.md).
BUILDS["separable-skips"] = replace(BUILDS["separable"], skips=True)
# Both capacity moves at once: the wide16 widths with additive skips, which there fit around C4 and
# C5 (80 -> 80 channels at 16x16; C8 and C9 shrink their maps): 49,488 parameters. One BatchNorm
# trial (doc/trials.md).
BUILDS["separable-wide16-skips"] = replace(BUILDS["separable-wide16"], skips=True)
# LayerNorm's build (weight standardization) with the additive skips of separable-skips: no extra
# parameters. First a LayerNorm trial of the BatchNorm/GroupNorm stack (doc/trials.md); now the build of
# the LayerNorm notebook (doc/tuning.md).
BUILDS["separable-ws-skips"] = replace(BUILDS["separable-ws"], skips=True)
# The separable build with linear squeezes (c3, c6: conv -> norm, no ReLU): no extra parameters.
# One BatchNorm trial (doc/trials.md).
BUILDS["separable-linear"] = replace(BUILDS["separable"], linear_squeeze=True)
# The separable build with MobileNet v1's blocks (a norm and ReLU between the depthwise and the
# pointwise conv): 800 norm parameters more, paid for by C9 at 104 channels instead of 112;
# 49,856 parameters. One BatchNorm trial (doc/trials.md).
BUILDS["separable-dwnorm"] = replace(BUILDS["separable"], depthwise_norm=True,
                                     widths=BUILDS["separable"].widths[:-1] + (104,))
# The separable build with ShuffleNet's grouped pointwise convs: each separable block's 1x1 mix in two
# groups of channels after a channel shuffle, which halves its weights; the saving pays for 25% more
# width at 16x16 and 40% more at 8x8. 49,416 parameters, receptive field 44. One BatchNorm trial
# (doc/trials.md): it fit the training set a little better and tested lower; not adopted.
BUILDS["separable-shuffle"] = replace(BUILDS["separable"], pointwise_groups=2,
                                      widths=(16, 32, 32, 80, 80, 80, 56, 136, 136, 152))
# The separable build with C8 and C9 padded, so the 8x8 stage stays 8x8 to the GAP: no extra
# parameters, and the two widest blocks (44% of the parameters) see 64 positions each instead of 36
# and 16, about 8% more multiply-adds in all. One BatchNorm trial (doc/trials.md).
BUILDS["separable-tail"] = replace(BUILDS["separable"], tail_padding=1)


class StdConv2d(nn.Conv2d):
    """A conv that uses each output filter of its weight at zero mean and unit variance (weight
    standardization); it trains the raw weight. torch has no such layer; timm's is the same."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias)


class LayerNorm2d(nn.GroupNorm):
    """LayerNorm for conv features: each sample is normalised over all of (C, H, W).

    That is exactly GroupNorm with a single group, so this *is* `nn.GroupNorm(1, C)`,
    named for what it does. Its affine scale and shift are per channel (2*C
    parameters), like BatchNorm's, so the three norms have the same parameter count
    and the layer works at any spatial size. `nn.LayerNorm([C, H, W])` would learn
    a scale and shift per element (2*C*H*W parameters: 32,768 for one 16x32x32 map)
    and would only accept inputs of that one size.
    """

    def __init__(self, num_channels, eps=1e-5):
        super().__init__(1, num_channels, eps=eps)


# The layer types make_norm returns (LayerNorm2d is a GroupNorm), for code that treats them apart.
NORM_LAYERS = (nn.BatchNorm2d, nn.GroupNorm)


def make_norm(norm, channels, groups, layer):
    """The normalisation layer for one block; `layer` names the block in error messages."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "ln":
        return LayerNorm2d(channels)
    if norm == "gn":
        if groups < 1 or channels % groups:
            valid = [g for g in range(1, channels + 1) if channels % g == 0]
            raise ValueError(
                f"GroupNorm: groups={groups} does not divide the {channels} channels of layer "
                f"{layer}. Choose groups from {valid} (it must divide the width of every layer).")
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r} in layer {layer}: choose one of "
                     + ", ".join(f"{k!r} ({v})" for k, v in NORMS.items()))


class ConvBlock(nn.Module):
    """conv (no bias) -> norm -> ReLU -> dropout (linear: conv -> norm), optionally with an additive skip."""

    def __init__(self, name, c_in, c_out, kernel_size, padding, norm, groups, dropout, skip,
                 separable=False, weight_standardization=False, linear=False, depthwise_norm=False,
                 pointwise_groups=1):
        super().__init__()
        # weight standardization for every conv that mixes channels, not for the depthwise 3x3
        # filters: at zero mean a 9-weight filter could only detect edges
        mixing = StdConv2d if weight_standardization else nn.Conv2d
        if separable and kernel_size > 1:
            # A 3x3 filter per input channel, then a 1x1 mix: 9*c_in + c_in*c_out weights
            # instead of 9*c_in*c_out, so the same budget buys about 9x the width.
            depthwise = [nn.Conv2d(c_in, c_in, kernel_size, padding=padding, groups=c_in, bias=False)]
            if depthwise_norm:      # MobileNet v1: the depthwise output is normalised and rectified too
                depthwise += [make_norm(norm, c_in, groups, f"{name} (depthwise)"), nn.ReLU()]
            if pointwise_groups > 1:
                if c_in % pointwise_groups or c_out % pointwise_groups:
                    raise ValueError(f"pointwise_groups={pointwise_groups} does not divide the {c_in} -> {c_out} "
                                     f"channels of separable block {name}: choose widths divisible by it")
                # without the shuffle, group g of every later block would only ever see group g's channels
                depthwise.append(nn.ChannelShuffle(pointwise_groups))
            self.conv = nn.Sequential(*depthwise, mixing(c_in, c_out, 1, groups=pointwise_groups, bias=False))
        else:
            self.conv = mixing(c_in, c_out, kernel_size, padding=padding, bias=False)
        self.norm = make_norm(norm, c_out, groups, name)
        # a linear block (Build.linear_squeeze) keeps the norm's output as it is
        self.relu = nn.Identity() if linear else nn.ReLU()
        self.drop = nn.Identity() if linear else nn.Dropout(dropout)
        # A skip is only possible where the block keeps the shape of its input.
        self.skip = skip and c_in == c_out and kernel_size == 2 * padding + 1

    def forward(self, x):
        y = self.drop(self.relu(self.norm(self.conv(x))))
        return x + y if self.skip else y


class Net(nn.Module):
    """C1 C2 c3 P1 C3 C4 C5 c6 P2 C7 C8 C9 GAP c10, returning log-probabilities (for NLL loss).

    norm:   "bn" (BatchNorm), "ln" (LayerNorm over C,H,W) or "gn" (GroupNorm)
    groups: GroupNorm's group count; must divide every width (ignored for bn/ln)
    build:  a name in BUILDS; `overrides` replace single fields of it, e.g. dropout=0.1
    """

    def __init__(self, norm="bn", groups=4, build="reference", num_classes=10, **overrides):
        super().__init__()
        if build not in BUILDS:
            raise ValueError(f"unknown build {build!r}: choose one of {sorted(BUILDS)}")
        cfg = replace(BUILDS[build], **overrides)
        if len(cfg.widths) != len(BLOCK_NAMES):
            raise ValueError(f"widths needs {len(BLOCK_NAMES)} numbers ({' '.join(BLOCK_NAMES)}), "
                             f"got {len(cfg.widths)}")
        unknown = set(cfg.separable) - set(SPATIAL_BLOCKS)
        if unknown:
            raise ValueError(f"separable names {sorted(unknown)}, which are not 3x3 blocks: "
                             f"choose from {list(SPATIAL_BLOCKS)}")
        self.norm_name, self.groups, self.build, self.cfg = norm, groups, build, cfg
        w = dict(zip(BLOCK_NAMES, cfg.widths))

        def block(name, c_in, kernel_size, padding):
            return ConvBlock(name, c_in, w[name], kernel_size, padding, norm, groups,
                             cfg.dropout, cfg.skips, name in cfg.separable, cfg.weight_standardization,
                             linear=cfg.linear_squeeze and name in SQUEEZE_BLOCKS,
                             depthwise_norm=cfg.depthwise_norm, pointwise_groups=cfg.pointwise_groups)

        tail = cfg.tail_padding
        # the smallest image that leaves C9 a pixel: two 2x2 pools, then C8 and C9 each take 2 * (1 - tail)
        self.min_size = 4 * (1 + 4 * (1 - tail))
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
            ("C8", block("C8", w["C7"], 3, tail)),    # (N, C8, 6, 6), 8x8 with tail_padding=1
            ("C9", block("C9", w["C8"], 3, tail)),    # (N, C9, 4, 4), 8x8 with tail_padding=1
            ("GAP", nn.AdaptiveAvgPool2d(1)),         # (N, C9, 1, 1)
            ("c10", nn.Conv2d(w["C9"], num_classes, 1, bias=False)),  # (N, 10, 1, 1)
        ]))

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Net expects a batch of RGB images shaped (N, 3, H, W), got {tuple(x.shape)}")
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(f"Net needs images of at least {self.min_size}x{self.min_size} pixels (two 2x2 poolings, "
                             f"then C8 and C9), got {x.shape[2]}x{x.shape[3]}: resize them first, e.g. with "
                             f"torchvision.transforms.Resize(32) (CIFAR-10's size)")
        x = self.layers(x)                  # (N, 10, 1, 1)
        x = x.flatten(1)                    # (N, 10)
        return F.log_softmax(x, dim=1)      # log-probabilities


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
            rows.append(dict(layer=name, kernel="global", stride="-", padding="-",
                             out=1, jump=jump, rf=rf))
            size = 1
            continue
        k, s, p = (v[0] if isinstance(v, tuple) else v
                   for v in (op.kernel_size, op.stride, op.padding))
        size = (size + 2 * p - k) // s + 1
        rf += (k - 1) * jump
        jump *= s
        rows.append(dict(layer=name, kernel=k, stride=s, padding=p, out=size, jump=jump, rf=rf))
    return rows


def format_receptive_field(rows):
    """The receptive-field table as fixed-width text."""
    head = f"{'layer':<6}{'kernel':>7}{'stride':>7}{'pad':>5}{'out':>5}{'jump':>6}{'RF':>5}"
    lines = [head] + [f"{r['layer']:<6}{r['kernel']!s:>7}{r['stride']!s:>7}{r['padding']!s:>5}"
                      f"{r['out']:>5}{r['jump']:>6}{r['rf']:>5}" for r in rows]
    return "\n".join(lines)

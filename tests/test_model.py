from dataclasses import replace

import pytest
import torch
from torch import nn
from torchsummary import summary

from model import BLOCK_NAMES, BUILDS, LayerNorm2d, Net, StdConv2d, count_parameters
from utils import receptive_field
import utils

NORM_TYPES = {"bn": nn.BatchNorm2d, "ln": LayerNorm2d, "gn": nn.GroupNorm}
NORM_LAYERS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_reference_build_parameters_shapes_and_receptive_field(norm):
    net = Net(norm)
    assert count_parameters(net) == 46064          # same count for every norm: 2 per channel
    out = net(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-5)   # log-probabilities
    rows = receptive_field(net)
    assert [r["layer"] for r in rows][-3:] == ["C9", "GAP", "c10"]
    assert next(r for r in rows if r["layer"] == "C9")["rf"] == 44
    assert next(r for r in rows if r["layer"] == "C9")["out"] == 4
    assert receptive_field(net, input_size=64)[-3]["out"] == 12


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_each_build_holds_only_the_norm_it_claims(norm):
    net = Net(norm, groups=4)
    norms = [m for m in net.modules() if isinstance(m, NORM_LAYERS)]
    assert len(norms) == 10                       # every block but c10
    assert all(type(m) is NORM_TYPES[norm] for m in norms)
    if norm != "bn":
        assert all(m.num_groups == {"ln": 1, "gn": 4}[norm] for m in norms)


def test_no_norm_has_a_conv_bias_where_the_norms_shift_was():
    """Net("none"): every norm an identity and every block's (last) conv a bias of one value per
    output channel, so it has the reference build's parameters less one per channel; with a norm no
    conv has a bias (the norm's shift is it). The optimizer and torchsummary take it."""
    net, with_norm = Net("none"), Net("bn")
    assert not any(isinstance(m, NORM_LAYERS) for m in net.modules())
    for name in BLOCK_NAMES:
        conv = getattr(net.layers, name).conv
        assert conv.bias.shape == (conv.out_channels,)
        assert getattr(with_norm.layers, name).conv.bias is None
    assert count_parameters(net) == 46064 - sum(BUILDS["reference"].widths) == 45808
    separable = Net("none", build="separable-skips").layers.C4.conv
    assert separable[0].bias is None and separable[1].bias.shape == (64,)       # the pointwise conv's
    recipe = utils.Recipe(build="reference")
    groups = utils.make_sgd(net, recipe, 0.1).param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == recipe.weight_decay   # nothing to spare
    assert summary(net, (3, 32, 32), device="cpu") is None                         # prints, raises nothing


@pytest.mark.parametrize("init, holds", [("he", True), ("default", False)])
def test_he_init_keeps_the_plain_networks_signal_at_scale_through_depth(cifar, load_benchmark, init, holds):
    """On real images, the no-norm reference network's every 3x3 block's output std at init stays
    within a factor of 3 of C1's with He init; with PyTorch's default it shrinks block by block."""
    x, y = utils.subset(cifar.test_images, cifar.test_labels, 256, seed=0)
    x = utils.Loader(x, y, *utils.channel_mean_std(cifar.train_images)).images
    torch.manual_seed(1)
    stds = load_benchmark("why_normalise").depth_stats(Net("none", init=init), x, y)["act_std"]
    assert all(1 / 3 < s / stds[0] < 3 for s in stds) is holds


def test_unknown_norm_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown norm 'batch'.*'bn'.*'ln'.*'gn'.*'none'"):
        Net("batch")
    with pytest.raises(ValueError, match="unknown norm 'batch'.*'bn'"):
        utils.recipe_for("batch")


def test_groups_that_do_not_divide_suggest_counts_that_divide_every_width():
    with pytest.raises(ValueError, match=r"groups=3 does not divide.*Choose groups from \[1, 2, 4, 8, 16\]"):
        Net("gn", groups=3)
    # 7 fails at C1 (16 channels); of 16's divisors only 1, 2 and 4 also divide c6's 12
    widths = (16, 32, 16, 32, 32, 32, 12, 16, 32, 32)
    with pytest.raises(ValueError, match=r"groups=7 .*Choose groups from \[1, 2, 4\]:") as e:
        Net("gn", groups=7, widths=widths)
    for g in eval(str(e.value).split("Choose groups from ")[1].split(":")[0]):
        Net("gn", groups=g, widths=widths)                  # every suggestion builds
    assert count_parameters(Net("gn", groups=16)) == 46064


def test_unknown_build_and_wrong_input():
    with pytest.raises(ValueError, match="unknown build"):
        Net("bn", build="huge")
    with pytest.raises(ValueError, match="unknown init 'xavier'.*'default'.*'he'"):
        Net("bn", init="xavier")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        Net("bn")(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"at least 20x20.*Resize\(32\)"):
        Net("bn")(torch.randn(2, 3, 16, 16))


def test_recipe_for_differs_between_norms_only_in_norm_and_groups():
    """The notebooks compare norms: every field of their recipes is the same but the GroupNorm-only
    group count, which the other norms ignore. Each build stays under 50,000 parameters."""
    recipes = {n: utils.recipe_for(n) for n in ("bn", "ln", "gn")}
    assert all(replace(r, groups=0) == replace(recipes["bn"], groups=0) for r in recipes.values())
    nets = {n: r.make_model(n) for n, r in recipes.items()}
    assert {n: count_parameters(m) for n, m in nets.items()} == {"bn": 49920, "ln": 49920, "gn": 49920}
    assert all(count_parameters(Net(n, groups=8, build=b)) < 50000 for b in BUILDS for n in ("gn", "none"))
    rows = {r["layer"]: r for r in receptive_field(nets["bn"])}
    assert rows["C9"]["rf"] == 44 and rows["C9"]["out"] == 4
    separable = [n for n, b in nets["bn"].layers.named_children()
                 if isinstance(getattr(b, "conv", None), nn.Sequential)]
    assert separable == ["C3", "C4", "C5", "C7", "C8", "C9"]
    assert len({tuple(type(m).__name__ for m in net.modules() if not isinstance(m, NORM_LAYERS))
                for net in nets.values()}) == 1                       # the same layers but the norms


def test_separable_blocks_are_depthwise_then_pointwise():
    widths = (16, 32, 32, 64, 64, 64, 48, 96, 96, 112)
    net = Net("bn", widths=widths, separable=("C4", "C8"))
    dw, pw = net.layers.C4.conv
    assert (dw.groups, dw.in_channels, dw.out_channels, dw.kernel_size) == (64, 64, 64, (3, 3))
    assert (pw.in_channels, pw.out_channels, pw.kernel_size) == (64, 64, (1, 1))
    assert isinstance(net.layers.C5.conv, nn.Conv2d)          # not named: a full 3x3 conv
    full = Net("bn", widths=widths)
    saved = (9 * 64 * 64 - (9 * 64 + 64 * 64)) + (9 * 96 * 96 - (9 * 96 + 96 * 96))
    assert count_parameters(full) - count_parameters(net) == saved
    assert receptive_field(net)[-3]["rf"] == 44                # the depthwise 3x3 keeps the RF
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_separable_skips_add_input_where_shapes_match():
    net = Net("bn", build="separable-skips").eval()
    skipped = [name for name, block in net.layers.named_children() if getattr(block, "skip", False)]
    assert skipped == ["c3", "C4", "C5"]          # 32->32 at 1x1, 64->64 at 3x3
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        block = net.layers.C4
        assert torch.equal(block(x), x + block.drop(block.relu(block.norm(block.conv(x)))))


def test_weight_standardization_standardises_mixing_filters_only():
    """build="separable-ws-skips": every conv that mixes channels uses its filters at zero mean and unit
    variance, so scaling and shifting a filter's raw weights changes nothing; the depthwise 3x3
    filters stay plain convs; no parameter is added."""
    net = Net("gn", groups=8, build="separable-ws-skips")
    assert count_parameters(net) == count_parameters(Net("gn", groups=8, build="separable-skips")) == 49920
    for conv in [net.layers.C1.conv, net.layers.C2.conv, net.layers.c3.conv, net.layers.C4.conv[1]]:
        assert isinstance(conv, StdConv2d)
        inp = torch.randn(2, conv.in_channels, 8, 8)
        with torch.no_grad():
            conv.weight.normal_()                           # unit variance: the eps is negligible
        before = conv(inp)
        with torch.no_grad():
            conv.weight.mul_(3.0).add_(0.7)                 # per filter: same after standardizing
        assert torch.allclose(conv(inp), before, rtol=1e-4, atol=1e-4)
    depthwise = net.layers.C4.conv[0]
    assert type(depthwise) is nn.Conv2d and depthwise.groups == depthwise.in_channels
    assert type(Net("gn", groups=8, build="separable-skips").layers.C1.conv) is nn.Conv2d
    out = net(torch.randn(2, 3, 32, 32))
    out.sum().backward()                                   # the raw weight gets the gradient
    assert net.layers.C1.conv.weight.grad.abs().sum() > 0

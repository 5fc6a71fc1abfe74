from dataclasses import replace

import pytest
import torch
from torch import nn

from model import BUILDS, LayerNorm2d, Net, StdConv2d, count_parameters, receptive_field
import utils

NORM_TYPES = {"bn": nn.BatchNorm2d, "ln": LayerNorm2d, "gn": nn.GroupNorm}


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


@pytest.mark.parametrize("build", sorted(BUILDS))
@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_every_build_stays_under_50k(build, norm):
    net = Net(norm, build=build)
    assert count_parameters(net) < 50000
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_receptive_field_follows_the_modules():
    """Padding C8/C9 keeps the 8x8 map; the receptive field is the same, the output size not."""
    rows = {r["layer"]: r for r in receptive_field(Net("bn", tail_padding=1))}
    assert rows["C9"]["out"] == 8 and rows["C9"]["rf"] == 44
    assert receptive_field(Net("bn"), input_size=64)[-3]["out"] == 12


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_each_build_holds_only_the_norm_it_claims(norm):
    net = Net(norm, groups=4)
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm,
                                                         nn.InstanceNorm2d))]
    assert len(norms) == 10                       # every block but c10
    assert all(type(m) is NORM_TYPES[norm] for m in norms)
    if norm == "ln":
        assert all(m.num_groups == 1 for m in norms)
    if norm == "gn":
        assert all(m.num_groups == 4 for m in norms)


def test_skips_only_where_shapes_match():
    net = Net("bn", build="wide-tail")
    skipped = [name for name, block in net.layers.named_children() if getattr(block, "skip", False)]
    assert skipped == ["C4", "C5"]                # the only 32->32 blocks of that build
    for name in skipped:
        block = getattr(net.layers, name)
        assert block.conv.in_channels == block.conv.out_channels and block.conv.padding == (1, 1)


def test_unknown_norm_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown norm 'batch'.*'bn'.*'ln'.*'gn'"):
        Net("batch")


def test_groups_that_do_not_divide_name_layer_channels_and_choices():
    with pytest.raises(ValueError, match=r"groups=3 does not divide the 16 channels of layer C1.*\[1, 2, 4, 8, 16\]"):
        Net("gn", groups=3)
    with pytest.raises(ValueError, match=r"groups=12 does not divide the 32 channels of layer C2"):
        Net("gn", groups=12, widths=(12, 32, 12, 12, 12, 12, 12, 12, 12, 12))
    assert count_parameters(Net("gn", groups=16)) == 46064


def test_unknown_build_and_wrong_input():
    with pytest.raises(ValueError, match="unknown build"):
        Net("bn", build="huge")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        Net("bn")(torch.randn(2, 1, 32, 32))
    # a fully convolutional net takes other sizes down to the smallest that leaves C9 a pixel, and names the fix below it
    for build, smallest in (("reference", 20), ("separable-tail", 4)):
        net = Net("bn", build=build).eval()
        assert net(torch.randn(2, 3, smallest, smallest)).shape == (2, 10)
        with pytest.raises(ValueError, match=rf"at least {smallest}x{smallest} pixels.*got {smallest - 1}x32.*Resize"):
            net(torch.randn(2, 3, smallest - 1, 32))


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


def test_separable_names_must_be_3x3_blocks():
    with pytest.raises(ValueError, match=r"separable names \['c3'\].*'C1'"):
        Net("bn", separable=("c3",))


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
def test_the_notebooks_separable_build(norm):
    """The builds the notebooks train (README section 3): 49,920 parameters, RF 44, with the
    notebooks' GroupNorm group count; all three with the skips (which cost no parameters), LayerNorm's
    with weight standardization too."""
    net = utils.recipe_for(norm).make_model(norm)
    assert net.build == ("separable-ws-skips" if norm == "ln" else "separable-skips")
    assert any(isinstance(m, StdConv2d) for m in net.modules()) == (norm == "ln")
    assert count_parameters(net) == 49920
    rows = {r["layer"]: r for r in receptive_field(net)}
    assert rows["C9"]["rf"] == 44 and rows["C9"]["out"] == 4
    separable = [n for n, b in net.layers.named_children() if isinstance(getattr(b, "conv", None), nn.Sequential)]
    assert separable == ["C3", "C4", "C5", "C7", "C8", "C9"]


def test_separable_tail_keeps_the_8x8_stage_at_8x8():
    net = Net("bn", build="separable-tail")
    assert count_parameters(net) == count_parameters(Net("bn", build="separable"))
    rows = {r["layer"]: r for r in receptive_field(net)}
    assert rows["C9"]["rf"] == 44 and rows["C8"]["out"] == rows["C9"]["out"] == 8
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_separable_skips_add_input_where_shapes_match():
    net = Net("bn", build="separable-skips").eval()
    skipped = [name for name, block in net.layers.named_children() if getattr(block, "skip", False)]
    assert skipped == ["c3", "C4", "C5"]          # 32->32 at 1x1, 64->64 at 3x3
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        block = net.layers.C4
        assert torch.equal(block(x), x + block.drop(block.relu(block.norm(block.conv(x)))))


def test_linear_squeeze_ends_c3_and_c6_at_their_norm():
    net = Net("bn", build="separable-linear").eval()
    assert count_parameters(net) == count_parameters(Net("bn", build="separable"))
    for name, block in net.layers.named_children():
        if name in ("c3", "c6"):
            x = torch.randn(2, block.conv.in_channels, 8, 8)
            with torch.no_grad():
                out = block(x)
                assert torch.equal(out, block.norm(block.conv(x)))
            assert (out < 0).any()                    # nothing clipped the negative half
        elif hasattr(block, "relu"):
            assert isinstance(block.relu, nn.ReLU) and isinstance(block.drop, nn.Dropout)


def test_depthwise_norm_rectifies_between_depthwise_and_pointwise():
    net = Net("bn", build="separable-dwnorm").eval()
    assert count_parameters(net) == 49856 < 50000
    plain = Net("bn", build="separable").eval()
    for name, block in net.layers.named_children():
        if name in ("C3", "C4", "C5", "C7", "C8", "C9"):
            dw, norm, relu, pw = block.conv
            assert dw.groups == dw.in_channels == norm.num_features == pw.in_channels
            assert isinstance(norm, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)
            x = torch.randn(2, dw.in_channels, 8, 8)
            with torch.no_grad():
                assert torch.equal(block.conv(x), pw(relu(norm(dw(x)))))
        elif hasattr(block, "conv"):
            # the full 3x3 and 1x1 blocks are those of the separable build
            assert type(block.conv) is type(getattr(plain.layers, name).conv)
    # the depthwise norm is the network's norm: GroupNorm with the network's groups
    gn = Net("gn", groups=8, build="separable-dwnorm")
    assert isinstance(gn.layers.C7.conv[1], nn.GroupNorm) and gn.layers.C7.conv[1].num_groups == 8


def test_shuffle_build_mixes_in_two_groups_after_a_channel_shuffle():
    net = Net("bn", build="separable-shuffle").eval()
    assert count_parameters(net) == 49416 < 50000
    assert receptive_field(net)[-3]["rf"] == 44
    for name in ("C3", "C4", "C5", "C7", "C8", "C9"):
        dw, shuffle, pw = getattr(net.layers, name).conv
        assert dw.groups == dw.in_channels and pw.groups == 2 and shuffle.groups == 2
        assert pw.weight.shape == (pw.out_channels, pw.in_channels // 2, 1, 1)   # half the weights
    # the shuffle interleaves the two halves, so each group of the 1x1 mix sees channels of both
    x = torch.arange(8.0).reshape(1, 8, 1, 1)
    assert net.layers.C8.conv[1](x).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # an output channel of C9's convolution depends on input channels of C8 from both groups:
    # perturb one channel of each half of C8's input and both change the first output channel.
    # Only the linear parts (depthwise, shuffle, grouped 1x1) are chained, so no ReLU can zero
    # the channel and hide the path (a random init once did exactly that).
    with torch.no_grad():
        c8, c9 = net.layers.C8.conv, net.layers.C9.conv
        x = torch.randn(1, 136, 8, 8)
        base = c9(c8(x))[0, 0]
        for channel in (0, 135):
            moved = x.clone()
            moved[0, channel] += 10
            assert not torch.allclose(c9(c8(moved))[0, 0], base)
    assert Net("gn", groups=8, build="separable-shuffle")(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_pointwise_groups_must_divide_the_widths():
    with pytest.raises(ValueError, match=r"pointwise_groups=3 does not divide the 32 -> 80 channels of separable block C3"):
        Net("bn", build="separable-shuffle", pointwise_groups=3)


def test_weight_standardization_standardises_mixing_filters_only():
    """build="separable-ws": every conv that mixes channels uses its filters at zero mean and unit
    variance, so scaling and shifting a filter's raw weights changes nothing; the depthwise 3x3
    filters stay plain convs; no parameter is added."""
    net = Net("gn", groups=8, build="separable-ws")
    assert count_parameters(net) == count_parameters(Net("gn", groups=8, build="separable")) == 49920
    for conv in [net.layers.C1.conv, net.layers.C2.conv, net.layers.c3.conv, net.layers.C4.conv[1]]:
        assert isinstance(conv, StdConv2d)
        inp = torch.randn(2, conv.in_channels, 8, 8)
        with torch.no_grad():
            conv.weight.normal_()                           # unit variance: the eps is negligible
        before = conv(inp)
        with torch.no_grad():
            conv.weight.mul_(3.0).add_(0.7)                 # per filter: same after standardizing
        assert torch.allclose(conv(inp), before, rtol=1e-4, atol=1e-4)
        w = conv.weight
        standardized = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / w.std(dim=(1, 2, 3), unbiased=False, keepdim=True)
        plain = nn.functional.conv2d(inp, standardized, padding=conv.padding)
        assert torch.allclose(conv(inp), plain, rtol=1e-4, atol=1e-4)
    depthwise = net.layers.C4.conv[0]
    assert type(depthwise) is nn.Conv2d and depthwise.groups == depthwise.in_channels
    assert type(Net("gn", groups=8, build="separable").layers.C1.conv) is nn.Conv2d
    out = net(torch.randn(2, 3, 32, 32))
    out.sum().backward()                                   # the raw weight gets the gradient
    assert net.layers.C1.conv.weight.grad is not None


def test_recipe_for_names_the_norms(monkeypatch):
    monkeypatch.setattr(utils, "NORM_RECIPES", {"ln": dict(lr=0.1)})
    assert utils.recipe_for("bn") == utils.Recipe()                     # no entry: the common recipe
    assert utils.recipe_for("ln") == replace(utils.Recipe(), lr=0.1)    # its entry on top
    with pytest.raises(ValueError, match="unknown norm 'batch'.*'bn'"):
        utils.recipe_for("batch")

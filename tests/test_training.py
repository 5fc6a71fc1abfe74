"""Loaders, augmentation, training, the optimizer and its schedule, the weight average and the lr
range test: the code paths every notebook runs."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import utils
from conftest import norm_by_hand
from model import Net


def test_loader_batches_labels_and_determinism(images):
    labels = torch.arange(20)
    # the label is written into the image, so we can check that it travels with it
    marked = images.clone()
    marked[:, 0, 0, 0] = labels.to(torch.uint8) * 10

    def make(seed):
        return utils.Loader(marked, labels, (0.5,) * 3, (0.25,) * 3, batch_size=8, shuffle=True,
                            augment=utils.Augment(flip=0, rotate_p=0), seed=seed)
    loader = make(0)
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [8, 8, 4]
    for x, y in batches:
        pixel = x[:, 0, 0, 0] * 0.25 + 0.5                      # undo the normalisation
        assert torch.allclose(pixel * 255, y.float() * 10, atol=1e-3)
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == list(range(20))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, make(0)))
    for other in (make(1), loader):                             # another seed, the loader's second epoch
        assert not all(torch.equal(a[1], b[1]) for a, b in zip(batches, other))


def test_augmentations_move_pixels_as_claimed():
    x = torch.randn(2, 3, 32, 32)
    # no shift, no flip, no turn: the same images
    assert torch.equal(utils.translate(x, torch.zeros(2, 2, dtype=torch.long), 4), x)
    assert torch.equal(utils.hflip(x, torch.zeros(2, dtype=torch.bool)), x)
    assert torch.allclose(utils.rotate(x, torch.zeros(2)), x, atol=1e-5)
    assert torch.equal(utils.hflip(x, torch.tensor([True, False]))[0], x[0].flip(2))
    shifted = utils.translate(x, torch.tensor([[2, -3], [0, 0]]), 4)
    assert torch.equal(shifted[0, :, 2:, :29], x[0, :, :30, 3:])        # down 2, left 3
    assert torch.all(shifted[0, :, :2] == 0) and torch.all(shifted[0, :, :, 29:] == 0)
    turned = utils.rotate(x, torch.tensor([90.0, 0.0]))
    assert torch.allclose(turned[0], x[0].rot90(1, dims=(1, 2)), atol=1e-4) or \
        torch.allclose(turned[0], x[0].rot90(-1, dims=(1, 2)), atol=1e-4)


def test_augment_draws_each_part_at_its_own_rate():
    """Over 20,000 draws each augmentation fires at its own probability (an inverted rotate_p would
    turn 90% of the images), and the loader applies what was drawn: all or none flipped at p = 1, 0."""
    aug = utils.Augment(flip=0.3, crop_pad=2, rotate_deg=10.0, rotate_p=0.1)
    flip, shift, angle = aug.draw(20000, torch.Generator().manual_seed(0))
    assert flip.float().mean().item() == pytest.approx(0.3, abs=0.015)
    assert (angle != 0).float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert angle.abs().max() <= 10 and sorted(shift.unique().tolist()) == [-2, -1, 0, 1, 2]
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    plain = images.float() / 255
    for p, expected in ((0.0, plain), (1.0, plain.flip(3))):
        loader = utils.Loader(images, torch.zeros(8, dtype=torch.long), (0,) * 3, (1,) * 3, batch_size=8,
                              augment=utils.Augment(flip=p, rotate_p=0))
        assert torch.allclose(next(iter(loader))[0], expected)


def test_both_loaders_normalise_by_the_training_images_statistics():
    """Train images dark, test images bright: both loaders subtract the train split's mean and divide
    by its std, so the test images come out shifted, not centred (their own statistics would centre them)."""
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 128, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    test = torch.randint(128, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = utils.CIFAR10(train, torch.arange(64) % 10, test, torch.arange(32) % 10, utils.CLASSES, "made up")
    recipe = utils.Recipe(augment=None)
    train_loader, test_loader = utils.make_loaders(data, recipe, "cpu")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in utils.channel_mean_std(train))
    assert torch.allclose(train_loader.images, (train / 255 - mean) / std, atol=1e-5)
    assert torch.allclose(test_loader.images, (test / 255 - mean) / std, atol=1e-5)
    assert test_loader.images.mean() > 1.5                          # far from centred


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_norm_by_hand_matches_the_layer(norm, mode):
    torch.manual_seed(0)
    net = Net(norm)
    block = net.layers.C2
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
        feat = block.conv(net.layers.C1(torch.randn(6, 3, 32, 32)))
        if norm == "bn":                          # give the running statistics real values
            block.norm.train()
            for _ in range(3):
                block.norm(feat + torch.randn_like(feat))
        getattr(block.norm, mode)()
        by_hand = norm_by_hand(feat, block.norm)
        assert torch.allclose(by_hand, block.norm(feat), atol=1e-5)
        # and it is not trivially true: the layer changes the values
        assert not torch.allclose(by_hand, feat, atol=1e-2)


def test_short_training_learns_well_above_chance(cifar):
    """Two epochs of the recipe (no weight average) on 4,096 real images, about 130 steps: the model
    must classify held-out test images far above chance (10%). A bug in training, the loaders or the
    norm leaves it near chance; the lr schedule ends near zero and never below."""
    recipe = utils.Recipe(build="reference", epochs=2, ema=0.0)
    train, test = utils.make_loaders(cifar, recipe, "cpu", seed=0, train_subset=4096, test_subset=1000)
    utils.set_seed(0)
    net = recipe.make_model("bn")
    history = utils.fit(net, train, test, recipe, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    assert set(history[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}
    assert history[-1]["test_acc"] > 30 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] == round(utils.evaluate(net, test)[1], 2)
    assert 0 < history[-1]["lr"] < recipe.lr / 50
    # misclassified picks really are misclassified by this model, one error of every class before a second
    index, predicted, true = utils.misclassified(net, test, n=10)
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(test.images[index]).argmax(1), predicted)
        all_wrong = net(test.images).argmax(1) != test.labels
    assert len(index) == 10 and torch.all(predicted != true) and torch.equal(true, test.labels[index])
    classes = test.labels[all_wrong].unique()
    k = min(10, len(classes))
    assert len(classes) > 1 and sorted(true[:k].tolist()) == sorted(classes[:k].tolist())


def test_epoch_loss_is_the_mean_over_images_not_over_batches(images):
    """Batches of 8, 8 and 4 images: the epoch's loss is the mean over all 20 images (a mean of the
    batch means would weigh the last 4 double). lr 0 and LayerNorm without dropout: each image's
    loss in the epoch is the one computed afterwards."""
    labels = torch.arange(20) % 10
    loader = utils.Loader(images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=8)
    net = Net("ln", build="reference", dropout=0.0)
    loss, acc = utils.train_epoch(net, loader, torch.optim.SGD(net.parameters(), lr=0.0))
    with torch.no_grad():
        log_probs = net(loader.images)
    per_image = nn.functional.nll_loss(log_probs, labels, reduction="none")
    assert loss == pytest.approx(per_image.mean().item(), rel=1e-5)
    batch_means = [b.mean().item() for b in per_image.split(8)]
    assert abs(loss - np.mean(batch_means)) > 1e-4                  # the wrong weighting would show
    assert acc == pytest.approx(100 * (log_probs.argmax(1) == labels).float().mean().item())


@pytest.mark.parametrize("capability, bf16", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_autocast_only_where_the_gpu_computes_bf16(monkeypatch, capability, bf16):
    """A T4 (7.5, Colab's free GPU) trains in fp32: cuDNN has no bf16 convolutions below 8.0."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert utils.computes_bf16("cuda") is bf16 and utils.computes_bf16(torch.device("cuda", 0)) is bf16
    assert utils.computes_bf16("cpu") is False


def decayed_parameters(model, recipe):
    """(names of model's parameters, names of those one optimizer step with zero gradients moved):
    such a step moves weights by weight decay alone."""
    optimizer, _ = utils.make_optimizer(model, recipe, steps_per_epoch=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return set(before), {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.parametrize("norm", ["bn", "ln", "gn"])
@pytest.mark.parametrize("decay_norms", [True, False])
def test_decay_norms_false_spares_the_norm_parameters_only(norm, decay_norms):
    recipe = utils.Recipe(decay_norms=decay_norms, groups=4, build="reference")
    model = recipe.make_model(norm)
    before, moved = decayed_parameters(model, recipe)
    norm_scales = {n for n in before if n.endswith(".norm.weight")}
    convs = {n for n in before if ".norm." not in n}
    assert len(norm_scales) == 10 and len(convs) == 11     # C1..C9 with their norms, and c10
    assert convs <= moved
    assert (norm_scales <= moved) == decay_norms
    assert moved <= convs | norm_scales      # the shifts start at zero, where decay does nothing


def test_ema_gives_the_model_its_averaged_weights_before_the_last_test(images):
    """With a decay this close to 1 the average barely leaves the initial weights, so the trained
    model must end where it started, BatchNorm's running statistics included (an average of the
    weights alone would hand over the trained statistics), and its last test must be that model's."""
    labels = torch.arange(len(images)) % 10
    loader = utils.Loader(images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=5, shuffle=True, seed=0)
    ends, running = {}, {}
    for ema in (0.0, 1 - 1e-9):
        recipe = utils.Recipe(build="reference", epochs=2, lr=0.1, batch_size=5, augment=None, ema=ema)
        utils.set_seed(0)
        net = recipe.make_model("bn")
        start = [p.detach().clone() for p in net.parameters()]
        history = utils.fit(net, loader, loader, recipe, progress=False)
        moved = max((p - s).abs().max().item() for p, s in zip(net.parameters(), start))
        ends[ema] = moved
        assert history[-1]["test_loss"] == round(utils.evaluate(net, loader)[0], 4)
        norm = net.layers.C1.norm
        running[ema] = max(norm.running_mean.abs().max().item(), (norm.running_var - 1).abs().max().item())
    assert ends[0.0] > 1e-2 and running[0.0] > 1e-3          # plain training moves weights and statistics ...
    assert ends[1 - 1e-9] < 1e-6 and running[1 - 1e-9] < 1e-6  # ... the near-frozen average neither


def test_every_recipe_field_reaches_what_it_configures():
    """Each Recipe field changed from its default shows in the model, the optimizer, the schedule or
    the loaders that the recipe builds; a field silently dropped fails here."""
    recipe = utils.Recipe(build="reference", groups=2, init="he", epochs=3, batch_size=32, lr=0.07,
                          momentum=0.8, nesterov=False, weight_decay=1e-3, warmup=0.5,
                          augment=utils.Augment(flip=0.2))
    model = recipe.make_model("gn")
    assert (model.build, model.init) == ("reference", "he")
    assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {2}
    assert {m.p for m in Net("bn", dropout=0.3).modules() if isinstance(m, nn.Dropout)} == {0.3}
    optimizer, scheduler = utils.make_optimizer(model, recipe, steps_per_epoch=10)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.8, False, 1e-3)
    lrs = []
    for _ in range(3 * 10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert max(lrs) == pytest.approx(0.07, rel=0.05) and 13 <= lrs.index(max(lrs)) <= 15   # half way up
    data = utils.CIFAR10(*(torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.arange(40) % 10) * 2,
                         utils.CLASSES, "zeros")
    train, test = utils.make_loaders(data, recipe, "cpu", test_batch_size=16)
    assert (train.batch_size, train.augment, train.shuffle, test.augment) == (32, recipe.augment, True, None)
    assert (len(train), test.batch_size, len(test)) == (2, 16, 3)


def test_read_lr_range_finds_the_fall_and_the_floor_past_the_noisy_start():
    """A made-up curve: a noisy plunge in the first steps, then a fall centred on lr 0.03, a floor
    at 0.3 and a rise after it. The readings are the fall and the floor, not the plunge."""
    lrs = list(np.geomspace(1e-3, 10, 200))
    x = np.log10(lrs)
    fall, rise = 0.3 * (1 + np.tanh((x - np.log10(0.03)) * 3)), 0.4 * np.clip(x - np.log10(0.3), 0, None) ** 2
    curve = 2.3 - fall + rise
    curve[:5] += np.linspace(1.0, 0.0, 5)             # the unsettled start: the steepest drop of all
    at_min, steepest = utils.read_lr_range(lrs, list(curve), span=50)
    assert 0.2 < at_min < 0.45
    assert 0.02 < steepest < 0.045
    assert utils.read_lr_range(lrs, list(curve), span=0)[1] <= lrs[4]    # without the skip: the plunge


def test_lr_range_record_leaves_the_notebook_run_alone_and_renders(cifar, tmp_path):
    """A range-test record on 256 real images names the norm's recipe, and the figure renders from it;
    the global RNG is as it was, so a notebook's training after it is unchanged."""
    import matplotlib
    matplotlib.use("Agg")
    recipe = utils.recipe_for("gn")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    record = utils.lr_range_record(cifar, "gn", recipe, torch.device("cpu"), steps=6, lr_min=1e-3, lr_max=1.0,
                                   train_subset=256, progress=False)
    assert torch.equal(torch.rand(3), expected)
    ran = (record["norm"], record["build"], record["recipe_lr"], record["seed"])
    assert ran == ("gn", recipe.build, recipe.lr, 1)
    assert record["params"] == sum(p.numel() for p in recipe.make_model("gn").parameters())
    assert len(record["lr"]) == 6 and record["lr"][0] == pytest.approx(1e-3)
    assert all(math.isfinite(loss) for loss in record["loss"])     # finite on real data at these lrs
    utils.plot_lr_range([record], path=tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 1000

import dataclasses
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

import utils
from conftest import norm_by_hand
from test_data import current_umask
from model import Net

ROOT = utils.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "doc" / "results"


def test_loader_batches_labels_and_determinism(images):
    labels = torch.arange(20)
    # the label is written into the image, so we can check that it travels with it
    marked = images.clone()
    marked[:, 0, 0, 0] = labels.to(torch.uint8) * 10
    make = lambda seed: utils.Loader(marked, labels, (0.5,) * 3, (0.25,) * 3, batch_size=8, shuffle=True,
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


def test_loader_rejects_wrong_images():
    with pytest.raises(ValueError, match=r"\(N, 3, 32, 32\)"):
        utils.Loader(torch.zeros(4, 3, 28, 28, dtype=torch.uint8), torch.zeros(4), (0,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="uint8"):
        utils.Loader(torch.zeros(4, 3, 32, 32), torch.zeros(4), (0,) * 3, (1,) * 3)


def test_augmentations_move_pixels_as_claimed():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(utils.translate(x, torch.zeros(2, 2, dtype=torch.long), 4), x)       # no shift, no flip,
    assert torch.equal(utils.hflip(x, torch.zeros(2, dtype=torch.bool)), x)                # no turn: the same
    assert torch.allclose(utils.rotate(x, torch.zeros(2)), x, atol=1e-5)
    assert torch.equal(utils.hflip(x, torch.tensor([True, False]))[0], x[0].flip(2))
    shifted = utils.translate(x, torch.tensor([[2, -3], [0, 0]]), 4)
    assert torch.equal(shifted[0, :, 2:, :29], x[0, :, :30, 3:])        # down 2, left 3
    assert torch.all(shifted[0, :, :2] == 0) and torch.all(shifted[0, :, :, 29:] == 0)
    turned = utils.rotate(x, torch.tensor([90.0, 0.0]))
    assert torch.allclose(turned[0], x[0].rot90(1, dims=(1, 2)), atol=1e-4) or \
        torch.allclose(turned[0], x[0].rot90(-1, dims=(1, 2)), atol=1e-4)


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


def test_short_training_lowers_the_loss(cifar):
    utils.set_seed(0)
    recipe = utils.Recipe(epochs=3, lr=0.05)
    train, test = utils.make_loaders(cifar, recipe, "cpu", seed=0, train_subset=2048, test_subset=512)
    # the same training images without augmentation, to measure the loss before and after
    seen, _ = utils.make_loaders(cifar, utils.Recipe(augment=None), "cpu", seed=0, train_subset=2048, test_subset=8)
    net = recipe.make_model("bn")
    before, _ = utils.evaluate(net, seen)
    history = utils.fit(net, train, test, recipe, progress=False)
    after, _ = utils.evaluate(net, seen)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert set(history[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert after < before - 0.2
    assert history[-1]["lr"] < recipe.lr / 50                 # one-cycle ends near zero, never below
    assert history[-1]["lr"] > 0
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


@pytest.mark.parametrize("capability, bf16", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_autocast_only_where_the_gpu_computes_bf16(monkeypatch, capability, bf16):
    """A T4 (7.5, Colab's free GPU) trains in fp32: cuDNN has no bf16 convolutions below 8.0."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert utils.computes_bf16("cuda") is bf16 and utils.computes_bf16(torch.device("cuda", 0)) is bf16
    assert utils.computes_bf16("cpu") is False


def test_results_file_round_trip_and_atomic(tmp_path, load_benchmark):
    records = load_benchmark("records")
    history = [dict(epoch=1, train_loss=1.0, train_acc=50.0, test_loss=1.1, test_acc=71.0, lr=0.01, seconds=2.0)]
    path = tmp_path / "results" / "bn.json"
    utils.save_results(path, "bn", 46064, "cpu", "test data", 1, history)
    assert records.load_results(path)["history"] == history
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()     # the usual permissions, not 0600
    with pytest.raises(ZeroDivisionError):
        utils._atomic_write(path, lambda f: (f.write("{partial"), 1 / 0))    # killed mid-write
    assert json.loads(path.read_text())["params"] == 46064      # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["bn.json"]  # no temporary left behind
    path.write_text(json.dumps({"norm": "bn"}))
    with pytest.raises(ValueError, match="lacks"):
        records.load_results(path)


def test_jsonl_appends_are_whole_and_a_cut_line_is_named(tmp_path, load_benchmark):
    records = load_benchmark("records")
    path = tmp_path / "runs.jsonl"
    records.append_jsonl(path, {"seed": 1})
    records.append_jsonl(path, {"seed": 2})
    assert records.read_jsonl(path) == [{"seed": 1}, {"seed": 2}]
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    with pytest.raises(TypeError):
        records.append_jsonl(path, {"seed": object()})              # fails before the file changes
    assert records.read_jsonl(path) == [{"seed": 1}, {"seed": 2}]
    path.write_text(path.read_text() + '{"seed": 3, "hist')          # a writer that was killed mid-line
    with pytest.raises(ValueError, match=r"runs\.jsonl, line 3: not a whole JSON record"):
        records.read_jsonl(path)


def test_plots_write_files(tmp_path, images, load_benchmark):
    import matplotlib
    matplotlib.use("Agg")
    report = load_benchmark("report")
    history = [dict(epoch=e, train_loss=1.0 / e, train_acc=60 + e, test_loss=1.1 / e, test_acc=59 + e,
                    lr=0.01, seconds=1.0) for e in (1, 2)]
    utils.show_images(images, torch.zeros(20, dtype=torch.long), path=tmp_path / "a.png")
    utils.plot_history(history, "BN", averaged_last=True, path=tmp_path / "b.png")
    report.plot_comparison({"BN": history, "GN": history}, path=tmp_path / "c.png")
    utils.plot_misclassified(images[:10], torch.arange(10), torch.arange(10).flip(0), path=tmp_path / "d.png")
    utils.plot_norm_methods(path=tmp_path / "e.png")
    utils.show_augmentations(images[:4], utils.Recipe().augment, (0.5,) * 3, (0.25,) * 3, path=tmp_path / "f.png")
    assert all((tmp_path / f"{n}.png").stat().st_size > 1000 for n in "abcdef")
    before = (tmp_path / "a.png").read_bytes()
    fig = utils.show_images(images[:2], nrows=1, ncols=2)

    def killed_mid_write(f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError("disk full")
    fig.savefig = killed_mid_write
    with pytest.raises(OSError):
        utils._finish(fig, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes() == before                # the old figure, whole


@pytest.mark.parametrize("norm", ["none", "bn", "ln", "gn"])
def test_depth_stats_hooks_record_one_value_per_block(norm, images):
    """One activation std and one gradient norm per 3x3 block, equal to what the block's output and
    its weights' .grad give; no hook and no gradient is left behind."""
    net = utils.Recipe(build="reference").make_model(norm)
    x, y = utils.Loader(images, torch.arange(20) % 10, (0.5,) * 3, (0.25,) * 3, batch_size=20).images, torch.arange(20) % 10
    torch.manual_seed(1)
    stats = utils.depth_stats(net, x, y)
    assert stats["blocks"] == ["C1", "C2", "C3", "C4", "C5", "C7", "C8", "C9"]
    assert len(stats["act_std"]) == len(stats["grad_norm"]) == 8
    assert all(p.grad is None for p in net.parameters()) and not any(m._forward_hooks for m in net.modules())
    torch.manual_seed(1)                                             # the same dropout masks
    outputs = {}
    for name in stats["blocks"]:
        getattr(net.layers, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
    utils.batch_loss(net, x, y)[0].backward()
    for k, name in enumerate(stats["blocks"]):
        grads = torch.cat([p.grad.flatten() for p in getattr(net.layers, name).conv.parameters()])
        assert stats["act_std"][k] == pytest.approx(outputs[name].std().item(), rel=1e-4)
        assert stats["grad_norm"][k] == pytest.approx(grads.norm().item(), rel=1e-4)


@pytest.mark.parametrize("swing", [0.05, 0.0])
def test_momentum_follows_the_recipe(swing):
    """One-cycle moves momentum against the lr within momentum +- swing; swing 0 holds it still."""
    recipe = replace(utils.Recipe(), momentum_swing=swing, epochs=2)

    def momenta(optimizer, scheduler):
        seen = []
        for _ in range(21):
            seen.append(optimizer.param_groups[0]["momentum"])
            optimizer.step()
            scheduler.step()
        return seen

    seen = momenta(*utils.make_optimizer(recipe.make_model("bn"), recipe, steps_per_epoch=10))
    assert (seen[0], round(min(seen), 2), seen.index(min(seen))) == ((0.95, 0.85, 5) if swing else (0.9, 0.9, 0))


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
    recipe = replace(utils.Recipe(), decay_norms=decay_norms, groups=4, build="reference")
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
    model must end where it started, and its last test must be that model's."""
    labels = torch.arange(len(images)) % 10
    loader = utils.Loader(images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=5, shuffle=True, seed=0)
    ends = {}
    for ema in (0.0, 1 - 1e-9):
        recipe = utils.Recipe(build="reference", epochs=2, lr=0.1, batch_size=5, augment=None, ema=ema)
        utils.set_seed(0)
        net = recipe.make_model("bn")
        start = [p.detach().clone() for p in net.parameters()]
        history = utils.fit(net, loader, loader, recipe, progress=False)
        moved = max((p - s).abs().max().item() for p, s in zip(net.parameters(), start))
        ends[ema] = moved
        assert history[-1]["test_loss"] == round(utils.evaluate(net, loader)[0], 4)
    assert ends[0.0] > 1e-2                   # plain training moves the weights ...
    assert ends[1 - 1e-9] < 1e-6              # ... the near-frozen average does not


def test_recipe_round_trips_through_its_record(load_benchmark):
    recipe = replace(utils.Recipe(), lr=0.1, augment=utils.Augment(flip=0.0, crop_pad=2))
    records = load_benchmark("records")
    assert records.recipe_from_dict(utils.recipe_dict(recipe)) == recipe
    old = dict(utils.recipe_dict(recipe), sam_rho=0.0, anneal="linear")     # removed switches, off: fine
    old["augment"] = dict(old["augment"], cutout=0)
    assert records.recipe_from_dict(old) == recipe
    with pytest.raises(ValueError, match=r"sam_rho=0\.05.*git tag 'trials-final'"):
        records.recipe_from_dict(dict(old, sam_rho=0.05))


def test_sweep_change_takes_the_fields_type(load_benchmark):
    """--change values become what the field holds: "False" for a bool is False (a string would be
    true and train the unchanged recipe), and an unknown field or bad value fails before training."""
    sweep = load_benchmark("sweep")
    assert sweep.parse_change("decay_norms=False") == ("decay_norms", False)
    assert sweep.parse_change("lr=0.1") == ("lr", 0.1) and type(sweep.parse_change("crop_pad=2")[1]) is int
    assert sweep.parse_change("build=reference") == ("build", "reference")
    assert sweep.parse_change("dropout=None") == ("dropout", None)
    (run,) = sweep.notebook_runs([1], ("ln",), **dict([sweep.parse_change("decay_norms=False")]))
    assert run["notebook_recipe"]["decay_norms"] is False
    with pytest.raises(ValueError, match="true or false"):
        sweep.parse_change("decay_norms=no")
    with pytest.raises(ValueError, match="FIELD one of"):
        sweep.parse_change("lrr=0.1")
    with pytest.raises(ValueError, match="takes int values"):
        sweep.parse_change("epochs=2.5")


def test_sweep_run_one_trains_and_records_the_run(cifar, capsys, load_benchmark):
    """One sweep run through the notebooks' code path (smoke mode: 1 epoch on 512 real images):
    its record carries the spec, the model's parameter count and a one-epoch history whose final
    accuracy is the record's; with progress on, the epoch line is printed."""
    sweep = load_benchmark("sweep")
    (spec,) = sweep.notebook_runs([1], ("gn",), build="reference")
    data_path = os.environ["S8_DATA"]
    r = sweep.run_one(spec, data_path, torch.device("cpu"), threads=1, smoke=True, progress=True)
    assert r["params"] == sum(p.numel() for p in Net("gn", groups=8, build="reference").parameters())
    assert (r["norm"], r["seed"], r["notebook_build"]) == ("gn", 1, "reference")
    assert len(r["history"]) == 1 and r["final"] == r["history"][-1]["test_acc"]
    assert 0 <= r["final"] <= 100 and r["seconds"] > 0
    printed = capsys.readouterr()
    assert "epoch  1" in printed.out + printed.err


def test_whiten_init_decorrelates_the_first_layer(cifar):
    train, _ = utils.make_loaders(cifar, utils.Recipe(augment=None), "cpu", seed=0, train_subset=1000,
                                  test_subset=8)
    utils.set_seed(0)
    net = utils.Recipe(whiten_c1=True).make_model("bn")
    conv = net.layers.C1.conv
    random_init = conv.weight.detach().clone()
    utils.whiten_init(conv, train.images)
    m = conv.out_channels // 2
    assert torch.equal(conv.weight[m:], -conv.weight[:m])           # each filter with its negative
    with torch.no_grad():
        out = nn.functional.conv2d(train.images, conv.weight[:m])     # (N, m, 30, 30): no padding
    out = out.transpose(0, 1).flatten(1)                              # (m, N*30*30)
    cov = torch.cov(out)
    assert torch.allclose(cov.diagonal(), torch.ones(m), atol=0.05)    # unit variance ...
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.05       # ... and decorrelated
    before = torch.cov(nn.functional.conv2d(train.images, random_init[:m]).transpose(0, 1).flatten(1))
    assert (before - torch.diag(before.diagonal())).abs().max() > 0.1  # which a random init is not
    # fit applies it when the recipe asks, and only then
    for whiten in (True, False):
        utils.set_seed(0)
        net = utils.Recipe(whiten_c1=whiten).make_model("bn")
        start = net.layers.C1.conv.weight.detach().clone()
        utils.fit(net, train, train, utils.Recipe(whiten_c1=whiten, epochs=1, lr=0.0), progress=False)
        assert torch.allclose(net.layers.C1.conv.weight, conv.weight if whiten else start)
    with pytest.raises(ValueError, match="full conv"):
        utils.whiten_init(nn.Conv2d(3, 3, 3, groups=3), train.images)


def small_loader(n=96, batch_size=32, seed=0):
    """Random images with random labels, batch 32: enough for a few optimizer steps."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return utils.Loader(images, labels, (0.5,) * 3, (0.25,) * 3, batch_size=batch_size, shuffle=True, seed=seed)


def test_lr_range_test_grows_the_lr_geometrically_across_epochs():
    """10 steps over a loader of 3 batches: the test runs on through the loader's epochs, each lr is a
    fixed multiple of the last, from lr_min to lr_max, and the smoothed loss is the debiased moving
    average of the raw loss."""
    recipe = utils.Recipe(build="reference")
    utils.set_seed(0)
    r = utils.lr_range_test(recipe.make_model("bn"), small_loader(), recipe, lr_min=1e-4, lr_max=1e-2,
                            steps=10, progress=False)
    assert len(r["lr"]) == len(r["loss"]) == len(r["smoothed"]) == 10 and not r["stopped_early"]
    assert r["lr"][0] == pytest.approx(1e-4) and r["lr"][-1] == pytest.approx(1e-2)
    ratios = [b / a for a, b in zip(r["lr"], r["lr"][1:])]
    assert ratios == pytest.approx([100 ** (1 / 9)] * 9)
    average = 0.0
    for step, (loss, smoothed) in enumerate(zip(r["loss"], r["smoothed"])):
        average = 0.98 * average + 0.02 * loss
        assert smoothed == pytest.approx(average / (1 - 0.98 ** (step + 1)))
    assert r["lr_at_min"] == r["lr"][r["smoothed"].index(min(r["smoothed"]))]
    assert r["lr_steepest"] in r["lr"] and r["lr_steepest"] <= r["lr_at_min"]


def test_read_lr_range_finds_the_fall_and_the_floor_past_the_noisy_start():
    """A made-up curve: a noisy plunge in the first steps, then a fall centred on lr 0.03, a floor
    at 0.3 and a rise after it. The readings are the fall and the floor, not the plunge."""
    lrs = list(np.geomspace(1e-3, 10, 200))
    x = np.log10(lrs)
    curve = 2.3 - 0.3 * (1 + np.tanh((x - np.log10(0.03)) * 3)) + 0.4 * np.clip(x - np.log10(0.3), 0, None) ** 2
    curve[:5] += np.linspace(1.0, 0.0, 5)             # the unsettled start: the steepest drop of all
    at_min, steepest = utils.read_lr_range(lrs, list(curve), span=50)
    assert 0.2 < at_min < 0.45
    assert 0.02 < steepest < 0.045
    assert utils.read_lr_range(lrs, list(curve), span=0)[1] <= lrs[4]    # without the skip: the plunge


def test_lr_range_test_stops_when_the_loss_blows_up():
    recipe = utils.Recipe(build="reference")
    utils.set_seed(0)
    r = utils.lr_range_test(recipe.make_model("bn"), small_loader(), recipe, lr_min=1e-2, lr_max=1e6,
                            steps=60, progress=False)
    assert r["stopped_early"] and len(r["lr"]) < 60
    last = r["smoothed"][-1]
    assert last != last or last > 4 * min(r["smoothed"][:-1])   # the last step is the one that blew up (or NaN)
    assert r["lr_at_min"] < r["lr"][-1]


def test_lr_range_test_rejects_bad_bounds():
    recipe = utils.Recipe(build="reference")
    net = recipe.make_model("bn")
    with pytest.raises(ValueError, match="lr_min < lr_max"):
        utils.lr_range_test(net, small_loader(), recipe, lr_min=1.0, lr_max=0.1, progress=False)
    with pytest.raises(ValueError, match="at least 3 steps"):
        utils.lr_range_test(net, small_loader(), recipe, steps=2, progress=False)


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
    assert (record["norm"], record["build"], record["recipe_lr"], record["seed"]) == ("gn", recipe.build, recipe.lr, 1)
    assert record["params"] == sum(p.numel() for p in recipe.make_model("gn").parameters())
    assert len(record["lr"]) == 6 and record["lr"][0] == pytest.approx(1e-3)
    assert all(l == l for l in record["loss"])     # finite on real data at these lrs
    utils.plot_lr_range([record], path=tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 1000


def test_batch_size_benchmark_scales_the_lr_and_keeps_the_rest_of_the_recipe(load_benchmark):
    batch_size = load_benchmark("batch_size")
    for norm in utils.NORMS:
        notebook, small = utils.recipe_dict(utils.recipe_for(norm)), utils.recipe_dict(batch_size.batch_recipe(norm, 16, 4))
        assert small["lr"] == pytest.approx(notebook["lr"] * 16 / 64)
        assert (small["batch_size"], small["epochs"], small["ema"]) == (16, 4, 0.0)
        assert {k for k in small if small[k] != notebook[k]} == {"lr", "batch_size", "epochs", "ema"}
    with pytest.raises(ValueError, match="at least one image"):
        batch_size.batch_recipe("bn", 0, epochs=4)


def test_batch_size_benchmark_records_each_run_and_resumes(cifar, load_benchmark, monkeypatch, tmp_path):
    batch_size, records, report = load_benchmark("batch_size"), load_benchmark("records"), load_benchmark("report")
    small = dataclasses.replace(cifar, test_images=cifar.test_images[::50], test_labels=cifar.test_labels[::50])
    monkeypatch.setattr(utils, "load_cifar10", lambda source=None: small)
    monkeypatch.setattr(batch_size.utils, "load_cifar10", lambda source=None: small)
    out = tmp_path / "batch-size.jsonl"
    argv = ["--out", str(out), "--norms", "bn,gn", "--batches", "2,8", "--epochs", "1", "--train-subset", "64"]
    batch_size.main(argv)
    runs = records.read_jsonl(out)
    assert [(r["norm"], r["batch_size"]) for r in runs] == [("bn", 2), ("gn", 2), ("bn", 8), ("gn", 8)]
    for r in runs:
        assert r["recipe"]["batch_size"] == r["batch_size"] and r["lr"] == r["recipe"]["lr"]
        assert r["base_batch"] == utils.recipe_for(r["norm"]).batch_size
        assert r["lr"] == pytest.approx(utils.recipe_for(r["norm"]).lr * r["batch_size"] / r["base_batch"])
        assert len(r["history"]) == 1 and r["final"] == r["history"][-1]["test_acc"]
        assert 0 <= r["final"] <= 100 and r["train_subset"] == 64
        assert r["best"] == max(h["test_acc"] for h in r["history"]) and r["seconds"] > 0
        assert r["params"] == utils.count_parameters(utils.recipe_for(r["norm"]).make_model(r["norm"]))
    batch_size.main(argv)                       # everything is in --out already: nothing runs again
    assert records.read_jsonl(out) == runs
    table = report.batch_size_table(runs)
    assert "| 2 | 32 | 0.001563 | **" in table and "| 8 | 8 | 0.00625 | **" in table
    assert f"lr scaled by batch / {utils.recipe_for('bn').batch_size} " in table
    assert table.count("not run") == 0 and "LayerNorm" not in table
    assert report.plot_batch_sizes(runs, path=tmp_path / "batch.png") and (tmp_path / "batch.png").stat().st_size


def test_make_loaders_takes_its_own_test_batch(cifar):
    recipe = utils.recipe_for("bn")
    train, test = utils.make_loaders(cifar, recipe, "cpu", train_subset=100, test_subset=120, test_batch_size=50)
    assert (train.batch_size, len(train)) == (64, 2) and (test.batch_size, len(test)) == (50, 3)
    assert utils.make_loaders(cifar, recipe, "cpu", train_subset=100, test_subset=120)[1].batch_size == 64

"""The benchmarks' code: results records, the sweep, the studies and the report's figures."""
import dataclasses
import json
from dataclasses import replace

import pytest
import torch

import utils
from test_data import current_umask


def test_results_file_round_trip_and_atomic(tmp_path, load_benchmark):
    records = load_benchmark("records")
    history = [dict(epoch=1, train_loss=1.0, train_acc=50.0, test_loss=1.1, test_acc=71.0, lr=0.01,
                    seconds=2.0)]
    path = tmp_path / "results" / "bn.json"
    utils.save_results(path, "bn", 46064, "cpu", "test data", 1, history)
    assert records.load_results(path)["history"] == history
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()     # the usual permissions, not 0600
    with pytest.raises(ZeroDivisionError):
        utils.atomic_write(path, lambda f: (f.write("{partial"), 1 / 0))    # killed mid-write
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


def test_recipe_round_trips_through_its_record(load_benchmark):
    recipe = replace(utils.Recipe(), lr=0.1, augment=utils.Augment(flip=0.0, crop_pad=2))
    records = load_benchmark("records")
    assert records.recipe_from_dict(utils.recipe_dict(recipe)) == recipe
    old = dict(utils.recipe_dict(recipe), sam_rho=0.0, whiten_c1=False)     # removed switches, off: fine
    del old["init"]                                # a field added later: the value old records trained with
    old["augment"] = dict(old["augment"], cutout=0)
    assert records.recipe_from_dict(old) == recipe
    with pytest.raises(ValueError, match=r"sam_rho=0\.05.*git checkout b3e7df349f68"):
        records.recipe_from_dict(dict(old, sam_rho=0.05))


def test_sweep_change_takes_the_fields_type(load_benchmark):
    """--change values become what the field holds: "False" for a bool is False (a string would be
    true and train the unchanged recipe), and an unknown field or bad value fails before training."""
    sweep = load_benchmark("sweep")
    assert sweep.parse_change("decay_norms=False") == ("decay_norms", False)
    assert sweep.parse_change("lr=0.1") == ("lr", 0.1) and type(sweep.parse_change("crop_pad=2")[1]) is int
    assert sweep.parse_change("build=reference") == ("build", "reference")
    assert sweep.parse_change("init=he") == ("init", "he")
    (run,) = sweep.notebook_runs([1], ("ln",), **dict([sweep.parse_change("decay_norms=False")]))
    assert run["notebook_recipe"]["decay_norms"] is False
    with pytest.raises(ValueError, match="true or false"):
        sweep.parse_change("decay_norms=no")
    with pytest.raises(ValueError, match="FIELD one of"):
        sweep.parse_change("lrr=0.1")
    with pytest.raises(ValueError, match="takes int values"):
        sweep.parse_change("epochs=2.5")


def test_plots_write_files(tmp_path, images, load_benchmark):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.image import imread
    report = load_benchmark("report")
    history = [dict(epoch=e, train_loss=1.0 / e, train_acc=60 + e, test_loss=1.1 / e, test_acc=59 + e,
                    lr=0.01, seconds=1.0) for e in (1, 2)]
    utils.show_images(images, torch.zeros(20, dtype=torch.long), path=tmp_path / "a.png")
    utils.plot_history(history, "BN", averaged_last=True, path=tmp_path / "b.png")
    report.plot_comparison({"BN": history, "GN": history}, path=tmp_path / "c.png")
    utils.plot_misclassified(images[:10], torch.arange(10), torch.arange(10).flip(0), path=tmp_path / "d.png")
    report.plot_norm_methods(path=tmp_path / "e.png")
    utils.show_augmentations(images[:4], utils.Recipe().augment, (0.5,) * 3, (0.25,) * 3,
                             path=tmp_path / "f.png")
    for name in "abcdef":                    # a picture, not an empty canvas
        pixels = imread(tmp_path / f"{name}.png")
        assert min(pixels.shape[:2]) > 100 and pixels[..., :3].std() > 0.05, name


def test_batch_size_benchmark_records_each_run_and_resumes(cifar, load_benchmark, monkeypatch, tmp_path):
    batch_size, records, report = (load_benchmark(n) for n in ("batch_size", "records", "report"))
    small = dataclasses.replace(cifar, test_images=cifar.test_images[::50],
                                test_labels=cifar.test_labels[::50])
    monkeypatch.setattr(utils, "load_cifar10", lambda source=None: small)
    monkeypatch.setattr(batch_size.utils, "load_cifar10", lambda source=None: small)
    out = tmp_path / "batch-size.jsonl"
    argv = ["--out", str(out), "--norms", "bn,gn", "--batches", "2,8", "--epochs", "1",
            "--train-subset", "64"]
    batch_size.main(argv)
    runs = records.read_jsonl(out)
    assert [(r["norm"], r["batch_size"]) for r in runs] == [("bn", 2), ("gn", 2), ("bn", 8), ("gn", 8)]
    for r in runs:
        assert r["recipe"]["batch_size"] == r["batch_size"] and r["lr"] == r["recipe"]["lr"]
        assert r["base_batch"] == utils.recipe_for(r["norm"]).batch_size
        assert r["lr"] == pytest.approx(utils.recipe_for(r["norm"]).lr * r["batch_size"] / r["base_batch"])
        assert len(r["history"]) == 1 and r["final"] == r["history"][-1]["test_acc"]
        assert r["data"] == small.source and r["train_subset"] == 64
        assert r["best"] == max(h["test_acc"] for h in r["history"]) and r["seconds"] > 0
        assert r["params"] == utils.count_parameters(utils.recipe_for(r["norm"]).make_model(r["norm"]))
    with pytest.raises(ValueError, match="at least one image"):
        batch_size.batch_recipe("bn", 0, epochs=4)
    batch_size.main(argv)                       # everything is in --out already: nothing runs again
    assert records.read_jsonl(out) == runs
    table = report.batch_size_table(runs)
    assert "| 2 | 32 | 0.001563 | **" in table and "| 8 | 8 | 0.00625 | **" in table
    assert f"lr scaled by batch / {utils.recipe_for('bn').batch_size} " in table
    assert table.count("not run") == 0 and "LayerNorm" not in table
    report.plot_batch_sizes(runs, path=tmp_path / "batch.png")
    assert (tmp_path / "batch.png").stat().st_size > 1000

import io
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import utils


def write_imagefolder(root, per_class=2, size=32, skip_class=None):
    """A small ImageFolder copy of real-looking JPEGs: train/<class>/*.jpg and test/<class>/*.jpg."""
    g = torch.Generator().manual_seed(1)
    for split in ("train", "test"):
        for c, name in enumerate(utils.CLASSES):
            if name == skip_class:
                continue
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                img = torch.full((3, size, size), 20 * c, dtype=torch.uint8)   # the class is in the pixels
                img[:, :4, :4] = torch.randint(0, 256, (3, 4, 4), generator=g, dtype=torch.uint8)
                path = root / split / name / f"{i:04d}.jpg"
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, quality=95)


def test_tar_gz_and_cache(tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "copy")
    archive = write_archive(tmp_path / "copy", tmp_path / "cifar.tar.gz")
    first = utils.load_cifar10(archive, data_dir=tmp_path / "data", full=False)
    assert len(list((tmp_path / "data" / "cache").glob("*.pt"))) == 1
    second = utils.load_cifar10(archive, data_dir=tmp_path / "data", full=False)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    folder = utils.load_cifar10(tmp_path / "copy", data_dir=tmp_path / "data2", full=False)
    assert torch.equal(first.train_images, folder.train_images)
    # labels stay with their images: the class index is in the pixels, which JPEG keeps within a few levels
    centre = first.train_images[:, 0, 16, 16].float()
    assert torch.allclose(centre, 20 * first.train_labels.float(), atol=3)
    # named by what they are, not where they lie
    assert first.source == second.source == "cifar.tar.gz (JPEG copy)" and folder.source == "copy (JPEG copy)"
    # a new decoder does not read what the old one cached: it decodes again, into a cache of its own
    monkeypatch.setattr(utils, "DECODER_VERSION", utils.DECODER_VERSION + 1)
    third = utils.load_cifar10(archive, data_dir=tmp_path / "data", full=False)
    assert len(list((tmp_path / "data" / "cache").glob("*.pt"))) == 2
    assert torch.equal(first.train_images, third.train_images)


def test_torchvision_pickle_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = dict(data=rng.integers(0, 256, (3, 3072), dtype=np.uint8), labels=[1, 5, 9])
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(utils.CLASSES)}))
    data = utils.load_cifar10(tmp_path, data_dir=tmp_path / "data", full=False)
    assert data.train_images.shape == (15, 3, 32, 32) and data.test_images.shape == (3, 3, 32, 32)
    assert data.train_labels.tolist() == [1, 5, 9] * 5
    # torchvision's layout: the 3072 values are the R plane, then G, then B, row-major
    expected = torch.from_numpy(batches["test_batch"]["data"][2]).view(3, 32, 32)
    assert torch.equal(data.test_images[2], expected)


def test_missing_source_names_the_ways_to_provide_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="S8_DATA"):
        utils.load_cifar10(tmp_path / "nowhere", data_dir=tmp_path / "data", full=False)


def test_offline_download_fails_with_the_fix(tmp_path, monkeypatch):
    import torchvision
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.delenv("S8_DATA", raising=False)
    with pytest.raises(RuntimeError, match=r"Could not download CIFAR-10.*S8_DATA.*tar\.gz"):
        utils.load_cifar10(data_dir=tmp_path / "data")


@pytest.mark.parametrize("damage", ["not an image", "cut in half"])
def test_damaged_image_file_is_named(tmp_path, damage):
    """One unreadable file in an otherwise whole copy: the error names it and says what to do."""
    write_imagefolder(tmp_path / "copy")
    bad = tmp_path / "copy" / "train" / "cat" / "0001.jpg"
    bad.write_bytes(b"plain text, no image" if damage == "not an image" else bad.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"cannot decode train/cat/0001\.jpg .*fetch the copy again") as e:
        utils.load_cifar10(tmp_path / "copy", data_dir=tmp_path / "data", full=False)
    assert "BytesIO" not in str(e.value)                          # the file's name, not a buffer's repr


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_decode_rgb_gives_three_channels_and_exact_lossless_pixels(mode):
    """PNG is lossless, so decode_rgb must give back the very pixels written, as (3, H, W) RGB."""
    pixels = torch.randint(0, 256, (32, 32, len(mode)), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1).numpy(), mode=mode).save(buffer, format="PNG")
    decoded = utils.decode_rgb(buffer.getvalue())
    assert decoded.shape == (3, 32, 32) and decoded.dtype == torch.uint8
    expected = pixels[..., :3] if mode != "L" else pixels.expand(32, 32, 3)     # alpha dropped, grey copied
    assert torch.equal(decoded, expected.permute(2, 0, 1))


def test_wrong_image_size(tmp_path):
    write_imagefolder(tmp_path / "copy", size=28)
    with pytest.raises(RuntimeError, match=r"28x28 pixels; CIFAR-10 images are 32x32"):
        utils.load_cifar10(tmp_path / "copy", data_dir=tmp_path / "data", full=False)


def test_missing_class_folder(tmp_path):
    write_imagefolder(tmp_path / "copy", skip_class="truck")
    with pytest.raises(RuntimeError, match=r"no folder for class\(es\) \['truck'\]"):
        utils.load_cifar10(tmp_path / "copy", data_dir=tmp_path / "data", full=False)


def test_mean_std_over_thousands_of_real_images_is_not_a_per_batch_average(cifar):
    """On 4,096 real images the average of per-batch stds (batches of 128) misses by ~3e-4; the exact
    one does not."""
    images = cifar.train_images[torch.randperm(50000, generator=torch.Generator().manual_seed(0))[:4096]]
    exact = (images.double() / 255).std(dim=(0, 2, 3), unbiased=False)
    per_batch = [(b.double() / 255).std(dim=(0, 2, 3), unbiased=False) for b in images.split(128)]
    batched = torch.stack(per_batch).mean(0)
    tol = 2e-5
    assert (batched - exact).abs().max() > 5 * tol                  # the mistake this test must catch
    _, std = utils.channel_mean_std(images)
    np.testing.assert_allclose(std, exact.numpy(), atol=tol, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        utils.channel_mean_std(images.float())


def test_real_data_set(cifar):
    """The real data (S8_DATA's copy or torchvision's download): full size, balanced, right statistics,
    named by what it is rather than by a path; the second load is fast."""
    assert cifar.train_images.shape == (50000, 3, 32, 32) and cifar.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(cifar.train_labels).tolist() == [5000] * 10
    assert torch.bincount(cifar.test_labels).tolist() == [1000] * 10
    mean, std = utils.channel_mean_std(cifar.train_images)
    np.testing.assert_allclose(mean, (0.491, 0.482, 0.447), atol=2e-3)
    np.testing.assert_allclose(std, (0.246, 0.243, 0.261), atol=3e-3)
    recipe = utils.Recipe()
    train, test = utils.make_loaders(cifar, recipe, "cpu")
    # every image once per epoch, the last batch short
    assert (len(train), len(test)) == (-(-50000 // recipe.batch_size), -(-10000 // recipe.batch_size))
    start = time.perf_counter()
    utils.load_cifar10(data_dir=utils.Path(__file__).parent.parent / "data")
    assert time.perf_counter() - start < 1.0
    assert "/" not in cifar.source and cifar.source.endswith(("(JPEG copy)", "(original CIFAR-10)"))
    grid = cifar.train_labels[utils.class_sample(cifar.train_labels, per_class=3)]
    assert grid.tolist() == list(range(10)) * 3          # one of each class in turn: a grid row each


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_archive(folder, path):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder / "train", "train")
        tar.add(folder / "test", "test")
    return path


def test_folder_cache_follows_every_file_inside(tmp_path):
    """Adding, deleting or rewriting one image in train/<class>/ changes what the next load returns."""
    write_imagefolder(tmp_path / "copy")
    load = lambda: utils.load_cifar10(tmp_path / "copy", data_dir=tmp_path / "data", full=False)  # noqa: E731
    assert len(load().train_images) == 20
    cache, = (tmp_path / "data" / "cache").glob("*.pt")
    assert cache.stat().st_mode & 0o777 == 0o666 & ~current_umask()      # not mkstemp's 0600
    extra = tmp_path / "copy" / "train" / "cat" / "0002.jpg"
    extra.write_bytes((tmp_path / "copy" / "train" / "cat" / "0000.jpg").read_bytes())
    assert len(load().train_images) == 21
    extra.unlink()
    (tmp_path / "copy" / "train" / "dog" / "0001.jpg").unlink()
    assert load().train_labels.tolist().count(utils.CLASSES.index("dog")) == 1
    target = tmp_path / "copy" / "test" / "ship" / "0000.jpg"
    Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8)).save(target, quality=95)
    ship = load().test_images[load().test_labels == utils.CLASSES.index("ship")]
    assert ship.float().mean(dim=(1, 2, 3)).max() > 250             # the white image, not the cached one


@pytest.mark.parametrize("damage", ["first 100 bytes", "last 8 bytes cut", "one byte flipped"])
def test_damaged_archive_gets_the_same_clear_error(tmp_path, damage):
    """Every damaged .tar.gz names its path and the fix: no bare EOFError, no silently wrong image."""
    write_imagefolder(tmp_path / "copy", per_class=3)
    archive = write_archive(tmp_path / "copy", tmp_path / "cifar.tar.gz")
    data = bytearray(archive.read_bytes())
    if damage == "first 100 bytes":
        data = data[:100]
    elif damage == "last 8 bytes cut":
        data = data[:-8]
    else:
        data[len(data) // 2] ^= 0x01
    archive.write_bytes(bytes(data))
    why = r"cifar\.tar\.gz' is (corrupt or truncated|not a readable).*[Ff]etch it again"
    with pytest.raises(RuntimeError, match=why):
        utils.load_cifar10(archive, data_dir=tmp_path / "data", full=False)


def test_a_copy_that_is_not_all_of_cifar10_is_refused_unless_asked(tmp_path):
    write_imagefolder(tmp_path / "copy")
    with pytest.raises(RuntimeError, match=r"train split has 20 images.*50,000.*fetch it again.*full=False"):
        utils.load_cifar10(tmp_path / "copy", data_dir=tmp_path / "data")
    smaller = utils.load_cifar10(tmp_path / "copy", data_dir=tmp_path / "data", full=False)
    assert len(smaller.test_labels) == 20


def test_quick_runs_write_figures_outside_doc(tmp_path, monkeypatch):
    import tempfile
    monkeypatch.chdir(tmp_path)
    assert utils.figure_dir(True).parent == utils.Path(tempfile.gettempdir())
    assert utils.figure_dir(True).is_dir()
    assert utils.figure_dir(False) == utils.Path("doc") and (tmp_path / "doc").is_dir()

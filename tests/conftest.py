"""Shared fixtures, and nbval settings: notebooks are compared on stdout only (tqdm's bars go to stderr)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "benchmarks"))


def pytest_collectstart(collector):
    if hasattr(collector, "skip_compare"):          # nbval's notebook collector
        collector.skip_compare += ("stderr",)


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same global seed: a result never hangs on a lucky draw in CI."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def cifar():
    """The real data set, as the notebooks load it: the copy S8_DATA points at, else torchvision's
    download into data/. Without either, the tests that need it fail with the loader's error, which
    says how to provide the data."""
    import utils
    try:
        return utils.load_cifar10(data_dir=ROOT / "data")
    except (FileNotFoundError, RuntimeError) as e:
        pytest.fail(f"the real-data tests need CIFAR-10: {e}", pytrace=False)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)


@pytest.fixture
def load_benchmark():
    """benchmarks/ scripts as modules, by name (they import each other, so benchmarks/ is on sys.path)."""
    import importlib
    return importlib.import_module


def norm_by_hand(x, layer):
    """A norm layer's output from plain tensor ops: mean and variance over its axes, scale and shift."""
    if isinstance(layer, torch.nn.BatchNorm2d):               # over (N, H, W), per channel; eval: running
        var, mean = (torch.var_mean(x, dim=(0, 2, 3), keepdim=True, unbiased=False) if layer.training else
                     (layer.running_var.view(1, -1, 1, 1), layer.running_mean.view(1, -1, 1, 1)))
        x_hat = (x - mean) / torch.sqrt(var + layer.eps)
    elif isinstance(layer, torch.nn.GroupNorm):              # LayerNorm2d is GroupNorm(1, C)
        groups = x.reshape(x.shape[0], layer.num_groups, -1)  # (N, G, C/G * H * W)
        var, mean = torch.var_mean(groups, dim=-1, keepdim=True, unbiased=False)
        x_hat = ((groups - mean) / torch.sqrt(var + layer.eps)).reshape(x.shape)
    else:
        raise TypeError(f"norm_by_hand knows BatchNorm2d and GroupNorm, not {type(layer).__name__}")
    return x_hat * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)

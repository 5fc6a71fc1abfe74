"""Speed of our data pipeline and training loop, against the conventional pipeline and the
network's own compute floor, measured side by side in one run on one machine.

    python benchmarks/speed.py --quick            # under 90 s on a 2-core CPU
    python benchmarks/speed.py --out doc/results/speed-cpu.json

Every figure is the median of several repeats. The last line reads
`overhead=<our epoch / compute floor> pipeline_speedup=<ours / conventional>
channels_last_speedup=<NCHW floor / channels_last floor> device=<type>`.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

import utils  # noqa: E402

BATCH = 128
# The same augmentation for both pipelines: flip, a rotation of up to 10 degrees, a padded crop.
AUGMENT = utils.Augment(flip=0.5, crop_pad=4, rotate_deg=10, rotate_p=1.0)


class PILDataset(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image, then the transforms."""

    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).numpy()     # (N, H, W, C) uint8, as CIFAR10.data
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats, device):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def drain(batches, device):
    """Consume a pipeline, moving each batch to the device as training would."""
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small subsets and 3 repeats (CI-sized)")
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: $S8_DATA or download)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args()
    device = utils.pick_device()
    repeats = 3 if a.quick else 5
    n_train = 2560 if a.quick and device.type == "cpu" else 50000
    n_pipe = 10240 if a.quick else 50000
    n_test = 2560 if a.quick and device.type == "cpu" else 10000

    data = utils.load_cifar10(a.data)
    mean, std = utils.channel_mean_std(data.train_images)
    pipe_x, pipe_y = utils.subset(data.train_images, data.train_labels, n_pipe)

    # 1. pipelines alone, no model
    ours = utils.Loader(pipe_x, pipe_y, mean, std, batch_size=BATCH, shuffle=True, augment=AUGMENT,
                        device=device)
    conventional = DataLoader(
        PILDataset(pipe_x, pipe_y, transforms.Compose([
            transforms.RandomHorizontalFlip(), transforms.RandomRotation(10),
            transforms.RandomCrop(32, padding=4), transforms.ToTensor(), transforms.Normalize(mean, std)])),
        batch_size=BATCH, shuffle=True, num_workers=2, pin_memory=device.type == "cuda",
        persistent_workers=True)
    t_ours = median_seconds(lambda: drain(ours, device), repeats, device)
    t_conv = median_seconds(lambda: drain(conventional, device), repeats, device)

    # 2. compute floor: forward, backward, step on one batch already on the device, for the
    #    notebooks' model (channels_last) and, side by side, the same model in plain NCHW layout
    recipe = utils.Recipe()
    model = recipe.make_model("bn").to(device)
    nchw_model = recipe.make_model("bn").to(device, memory_format=torch.contiguous_format)
    train_x, train_y = utils.subset(data.train_images, data.train_labels, n_train)
    train_loader = utils.Loader(train_x, train_y, mean, std, batch_size=BATCH, shuffle=True,
                                augment=recipe.augment, device=device, channels_last=True)
    steps = len(train_loader) * (2 * repeats + 2)    # covers warm-up, floor and epoch repeats
    optimizer, scheduler = utils.make_optimizer(model, recipe, steps)
    nchw_optimizer, _ = utils.make_optimizer(nchw_model, recipe, steps)
    x0, y0 = next(iter(train_loader))
    model.train()
    nchw_model.train()

    def floor_batches(net=model, opt=optimizer, x=x0):
        for _ in range(len(train_loader)):
            with utils.autocast(device):
                out = net(x)
            loss = F.nll_loss(out.float(), y0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def nchw_floor_batches():
        floor_batches(nchw_model, nchw_optimizer, x0.contiguous())

    floor_batches()                                 # warm-up (allocator, cuDNN autotune)
    nchw_floor_batches()
    t_floor = median_seconds(floor_batches, repeats, device)
    t_floor_nchw = median_seconds(nchw_floor_batches, repeats, device)

    # 3. our training epoch, exactly as the notebooks run it
    t_epoch = median_seconds(lambda: utils.train_epoch(model, train_loader, optimizer, scheduler),
                             repeats, device)

    # 4. evaluation throughput on the test split
    test_x, test_y = utils.subset(data.test_images, data.test_labels, n_test)
    test_loader = utils.Loader(test_x, test_y, mean, std, batch_size=BATCH, device=device)
    t_eval = median_seconds(lambda: utils.evaluate(model, test_loader), repeats, device)

    rows = [
        ("pipeline: ours (utils.Loader)", n_pipe / t_ours, "images/s, augmented + normalised, no model"),
        ("pipeline: conventional (PIL + DataLoader, 2 workers)", n_pipe / t_conv, "images/s, no model"),
        ("compute floor (one batch, repeated)", n_train / t_floor, "images/s, forward + backward + step"),
        ("compute floor, NCHW layout", n_train / t_floor_nchw, "images/s, the same without channels_last"),
        ("our training epoch", n_train / t_epoch, "images/s, loader + training step"),
        ("evaluation", n_test / t_eval, "images/s, test split, inference mode"),
    ]
    overhead = t_epoch / t_floor
    speedup = t_conv / t_ours
    layout_speedup = t_floor_nchw / t_floor
    name = utils.device_name(device)
    print(f"device: {name} | torch {torch.__version__} | build {recipe.build} | batch {BATCH} | "
          f"median of {repeats} | "
          f"{n_train} train / {n_pipe} pipeline / {n_test} test images")
    print(f"{'what':<55}{'images/s':>12}  ")
    for what, rate, note in rows:
        print(f"{what:<55}{rate:>12,.0f}  {note}")
    print(f"seconds per 50,000-image epoch at our training speed: {50000 * t_epoch / n_train:.1f}")
    if a.out:
        record = dict(device=name, device_type=device.type, torch=torch.__version__, quick=a.quick,
                      build=recipe.build, channels_last_speedup=round(layout_speedup, 2),
                      repeats=repeats,
                      rows=[dict(what=w, images_per_s=round(r, 1), note=n) for w, r, n in rows],
                      epoch_seconds=round(50000 * t_epoch / n_train, 2),
                      overhead=round(overhead, 3), pipeline_speedup=round(speedup, 2))
        utils.atomic_write(a.out, lambda f: json.dump(record, f, indent=1))
    print(f"overhead={overhead:.2f} pipeline_speedup={speedup:.1f} "
          f"channels_last_speedup={layout_speedup:.2f} device={device.type}")


if __name__ == "__main__":
    main()

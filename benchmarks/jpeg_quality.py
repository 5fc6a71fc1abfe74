"""What does JPEG compression cost the notebooks' recipe? A diagnostic of the data, not a trial.

The only CIFAR-10 copy on the development machines stores every image as a JPEG at quality 75
with 4:2:0 chroma subsampling (../shared/data/README.md); the original files are not reachable.
The loss from the original pixels to that copy cannot be measured here, but the next step down
can: this script re-encodes the copy (train and test images alike) at a lower quality, writes it
as an ImageFolder .tar.gz under data/ (git-ignored), and trains a notebook's recipe on it through
benchmarks/sweep.py, with the seed of the notebook's own run (or --seed 2, 3 for its seed runs). The
images keep their order, so a run draws the same batches, flips and dropout masks as the run of
that seed on the copy and differs from it only in the pixels.

JPEG's quality q scales its quantization steps by 50/q (q <= 50) or (100 - q)/50 (q > 50):
quality 75 quantizes with half the base steps, 50 with the base steps, 25 with twice them.

Re-encoding at the copy's own quality 75 changes almost nothing, because JPEG's 8x8 blocks fall where
they fell before and its quantization is nearly idempotent there. With --shift N the encoder's block
grid is moved N pixels against the image (each image is padded by N edge pixels on every side, encoded,
decoded and cropped back), so the same quality meets the pixels as the first encoding met the
original ones: a stand-in for one more pass of what made the copy, at the copy's own quality.

    python benchmarks/jpeg_quality.py --data ../shared/data/cifar10-jpeg.tar.gz --quality 50 \\
        --out doc/results/jpeg-quality.jsonl
    # one more pass of the copy's own compression, block grid moved by 4 pixels
    python benchmarks/jpeg_quality.py --data ../shared/data/cifar10-jpeg.tar.gz --quality 75 --shift 4 \\
        --out doc/results/jpeg-quality.jsonl
    # the figure of doc/tuning.md, section 6: test images at the copy's quality, 50 and 25
    python benchmarks/jpeg_quality.py --data ../shared/data/cifar10-jpeg.tar.gz --quality 50,25 \\
        --figure doc/jpeg_quality.png
"""
import argparse
import io
import os
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import records  # noqa: E402
import utils  # noqa: E402
from sweep import notebook_runs, run_one  # noqa: E402


def check_encoding(quality, shift):
    """A clear error for a JPEG quality or block-grid shift that does not exist."""
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality}: JPEG quality runs from 1 (smallest files) to 100")
    if not 0 <= shift <= 7:
        raise ValueError(f"shift={shift}: move the 8x8 block grid by 0 to 7 pixels (8 is the grid again)")


def encode(image, fmt, **options):
    """uint8 pixels (3, H, W) as the bytes of one image file, written by Pillow: fmt "JPEG" (libjpeg, 4:2:0
    chroma subsampling; options: quality) or "PNG" (lossless). utils.decode_rgb reads them back."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def reencode(images, quality, shift=0):
    """uint8 images (N, 3, H, W) through JPEG at `quality` and back (encode, then utils.decode_rgb).
    shift > 0 first pads every side by `shift` edge pixels, so JPEG's 8x8 blocks (16x16 for the subsampled
    colour) fall `shift` pixels off where they fell before, and crops the decoded images back to (H, W)."""
    check_encoding(quality, shift)
    h, w = images.shape[-2:]
    if shift:
        # replicate padding runs on floats; the padded pixels are copies of uint8 ones, so exact
        images = F.pad(images.float(), (shift,) * 4, mode="replicate").to(torch.uint8)
    decoded = torch.stack([utils.decode_rgb(encode(image, "JPEG", quality=quality)) for image in images])
    return decoded[..., shift:shift + h, shift:shift + w].contiguous()


def write_jpeg_copy(data, path, quality, shift=0, batch=1000):
    """Write `data` (a utils.CIFAR10) as an ImageFolder .tar.gz, each image as reencode(image, quality,
    shift) holds it: at shift 0 the encoder's own JPEG file, else the decoded and cropped result as a
    PNG file (lossless, so the pixels are exactly reencode's). Files are named by their index within
    their class, so utils.load_cifar10 reads them back in `data`'s order where `data` is grouped by
    class, as every ImageFolder copy loads (torchvision's pickles are not: their copy comes back
    sorted by class)."""
    check_encoding(quality, shift)      # before a half-written archive could be left behind
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for split in ("train", "test"):
            images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
            seen = [0] * len(data.classes)
            desc = f"encoding {split} at quality {quality}" + (f", grid moved {shift} px" if shift else "")
            for start in tqdm(range(0, len(images), batch), desc=desc, mininterval=5, ascii=True):
                chunk = images[start:start + batch]
                if shift:
                    chunk = reencode(chunk, quality, shift)
                    files, suffix = [encode(img, "PNG") for img in chunk], "png"
                else:
                    files, suffix = [encode(img, "JPEG", quality=quality) for img in chunk], "jpg"
                for file, label in zip(files, labels[start:start + batch].tolist()):
                    member = tarfile.TarInfo(f"{split}/{data.classes[label]}/{seen[label]:05d}.{suffix}")
                    member.size = len(file)
                    tar.addfile(member, io.BytesIO(file))
                    seen[label] += 1
    tmp.replace(path)       # a cut-off run leaves no half-written archive behind
    return path


def plot_qualities(data, qualities, path, shift=0, per_row=8):
    """The same test images (one per class, the first 8 classes) as the copy holds them, then
    re-encoded at each of `qualities` (with the block grid moved by `shift`): one row each."""
    first = [int((data.test_labels == c).nonzero()[0]) for c in range(per_row)]
    images = data.test_images[first]
    rows = [images] + [reencode(images, q, shift) for q in qualities]
    moved = f" +{shift}px" if shift else ""
    captions = [f"{data.classes[c]}, {name}" for name in ["copy"] + [f"q{q}{moved}" for q in qualities]
                for c in range(per_row)]
    return utils.show_images(torch.cat(rows), captions=captions, nrows=len(rows), ncols=per_row, path=path,
                             title="The JPEG copy (quality 75), then re-encoded"
                             + (f" with the block grid moved {shift} px" if shift else " at lower qualities"))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the CIFAR-10 copy to re-encode (see utils.load_cifar10)")
    p.add_argument("--quality", required=True, help="JPEG quality of the re-encoded copy (1-100); "
                   "with --figure, several, comma-separated")
    p.add_argument("--out", help="JSON-lines file the run's record is appended to")
    p.add_argument("--shift", type=int, default=0, help="move JPEG's block grid by this many pixels (0-7) "
                   "against the copy's, so --quality 75 is one more pass of the copy's own compression")
    p.add_argument("--norm", default="bn", choices=sorted(utils.NORMS))
    p.add_argument("--seed", type=int, default=1, help="1: the notebook's own run")
    p.add_argument("--figure", default=None, metavar="PNG", help="only draw test images at the copy's and "
                   "lower qualities (--quality, comma-separated; --shift moves their block grid) into PNG, "
                   "and train nothing")
    a = p.parse_args()
    try:
        qualities = [int(q) for q in a.quality.split(",")]
    except ValueError:
        p.error(f"--quality {a.quality!r}: give whole numbers from 1 to 100, e.g. 50 (or 50,25 with --figure)")
    if a.figure:
        plot_qualities(utils.load_cifar10(a.data), qualities, a.figure, a.shift)
        return
    if not a.out or len(qualities) != 1:
        p.error("a training run needs --out and one --quality (several only with --figure)")
    quality, = qualities
    try:
        check_encoding(quality, a.shift)
    except ValueError as e:
        p.error(str(e))
    source = utils.load_cifar10(a.data)
    name = f"cifar10-reencoded-q{quality}" + (f"-shift{a.shift}" if a.shift else "")
    copy = write_jpeg_copy(source, Path("data") / f"{name}.tar.gz", quality, a.shift)
    reencoded = utils.load_cifar10(copy)
    change = (reencoded.train_images.float() - source.train_images.float()).abs().mean().item()
    print(f"{copy}: {copy.stat().st_size / 2**20:.1f} MiB, mean absolute change {change:.2f} levels", flush=True)
    spec, = notebook_runs([a.seed], (a.norm,))
    start = time.time()
    record = run_one(spec, str(copy), utils.pick_device(), threads=os.cpu_count() or 1, progress=True)
    moved = f", block grid moved {a.shift} px" if a.shift else ""
    record.update(data=f"{Path(a.data).name} re-encoded at JPEG quality {quality}{moved}",
                  jpeg_quality=quality, jpeg_shift=a.shift, mean_abs_change=round(change, 3))
    records.append_jsonl(a.out, record)
    print(a.norm, "seed", a.seed, "quality", quality, "shift", a.shift, "->", record["final"],
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()

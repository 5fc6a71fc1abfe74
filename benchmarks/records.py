"""Results records of the benchmarks: one training run as a record, .jsonl files of them, and the
Recipe a record trained. The notebooks write their own results file with utils.save_results.
"""
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import utils  # noqa: E402
from utils import Augment, Recipe, count_parameters, device_name, fit  # noqa: E402

# The commit of main whose code ran the tuning trials (doc/tuning.md): `git checkout` it to rerun one.
HISTORY_COMMIT = "b3e7df349f6825934967ca7ad385352ab35bb46f"


def fit_record(model, train_loader, test_loader, recipe, progress=False):
    """`fit`, timed, as the fields of a benchmark record: parameters, final and best test accuracy,
    final train accuracy, seconds, device and history."""
    start = time.time()
    history = fit(model, train_loader, test_loader, recipe, progress=progress)
    return dict(params=count_parameters(model), final=history[-1]["test_acc"],
                best=max(h["test_acc"] for h in history), train_final=history[-1]["train_acc"],
                seconds=round(time.time() - start, 1), device=device_name(next(model.parameters()).device),
                history=history)


def load_results(path):
    with open(path) as f:
        record = json.load(f)
    missing = {"norm", "params", "device", "data", "seed", "history"} - set(record)
    if missing:
        raise ValueError(f"{path}: results file lacks {sorted(missing)}")
    return record


def append_jsonl(path, record):
    """Add one record as a line of a .jsonl results file: the file is rewritten whole, so a run
    killed mid-write leaves the old file or the new one."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    utils.atomic_write(path, lambda f: f.write(old + (json.dumps(record) + "\n").encode()), binary=True)


def read_jsonl(path):
    """The records of a .jsonl results file, one per line; none when the file does not exist yet."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {i}: not a whole JSON record ({e}); a write was cut off? "
                                 f"Delete that line and run what it recorded again.") from None
    return records


def recipe_from_dict(record):
    """The Recipe that recipe_dict wrote. A switch this code no longer has is refused unless it was
    off; the code that had it is at the commit HISTORY_COMMIT. A field added since a record was
    written takes the value that record trained with (ADDED_FIELD_DEFAULT)."""
    record = dict(record)
    augment = dict(record.pop("augment"))
    for cls, values in ((Recipe, record), (Augment, augment)):
        known = {f.name for f in fields(cls)}
        for name in [n for n in values if n not in known]:
            value = values.pop(name)
            if value not in REMOVED_SWITCH_OFF.get(name, ()):
                raise ValueError(f"the record sets {name}={value!r}, a switch this code no longer has: "
                                 f"git checkout {HISTORY_COMMIT[:12]} to train it")
    return Recipe(**record, augment=Augment(**augment))


# What the switches that were measured and dropped (doc/tuning.md) read when they were off.
REMOVED_SWITCH_OFF = {"decay_depthwise": (True,), "train_norm_scale": (True,), "sam_rho": (0.0,),
                      "anneal": ("linear",), "precise_bn": (False,), "flip_alternate": (False,),
                      "cutout": (0,), "label_smoothing": (0.0,), "momentum_swing": (0.0,),
                      "dropout": (None,), "whiten_c1": (False,)}
# Recipe fields added after records were written, with the value every older record trained with.
ADDED_FIELD_DEFAULT = {"init": "default"}

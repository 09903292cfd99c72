"""DVC stage ``prepare``: multi-scale Y-channel training patches and the validation images, in HDF5.

Run from the repository root: ``python stages/prepare.py``. Reads the ``prepare`` section of
``params.yaml`` and the images under ``data/raw/<set>/``; writes ``data/prepared/train.h5`` and
``data/prepared/val.h5`` (layout: :mod:`vdsr.prepare` and the README).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vdsr.config import ParamsError, load_section, require
from vdsr.images import ImageError, list_images
from vdsr.io import atomic_path, error_message, remove_stale_temporaries
from vdsr.prepare import WorkerError, write_training_set, write_validation_set

RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")  # the stage's `outs` in dvc.yaml
SETS = ("T91", "BSD200", "Set5", "Set14")

log = logging.getLogger("vdsr.stages.prepare")


@dataclass(frozen=True)
class PrepareParams:
    train_sets: list[str]  # training images: the paper's 291 = T91 + BSD200
    val_set: str  # whole images validated on during training
    scales: list[int]  # 2, 3 and/or 4, mixed in one file
    downsizing: list[float]  # HR images are also used shrunk by these factors, in (0, 1]
    patch_size: int  # patch side in pixels
    stride: int  # step between patches; = patch_size for non-overlapping patches
    workers: int  # image-processing processes

    def __post_init__(self) -> None:
        require(len(self.train_sets) > 0, "prepare.train_sets", "at least one set", self.train_sets)
        for i, name in enumerate([*self.train_sets, self.val_set]):
            key = f"prepare.train_sets[{i}]" if i < len(self.train_sets) else "prepare.val_set"
            require(name in SETS, key, "one of " + ", ".join(SETS), name)
        require(len(self.scales) > 0, "prepare.scales", "at least one scale", self.scales)
        for i, scale in enumerate(self.scales):
            require(scale in (2, 3, 4), f"prepare.scales[{i}]", "2, 3 or 4", scale)
        require(len(set(self.scales)) == len(self.scales), "prepare.scales", "no repeated scale", self.scales)
        require(len(self.downsizing) > 0, "prepare.downsizing", "at least one factor", self.downsizing)
        for i, factor in enumerate(self.downsizing):
            require(0.1 <= factor <= 1.0, f"prepare.downsizing[{i}]", "a factor in [0.1, 1.0]", factor)
        # VDSR's 20 layers see 41x41: smaller patches would train on zero padding (needs >= 3 for any model).
        require(self.patch_size >= 8, "prepare.patch_size", "a patch side >= 8 pixels", self.patch_size)
        require(1 <= self.stride, "prepare.stride", "a step >= 1 pixel", self.stride)
        require(self.workers >= 1, "prepare.workers", "an integer >= 1", self.workers)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_section(PrepareParams, "prepare")
        log.info("prepare: params %s", dataclasses.asdict(params))
        train_images = [path for name in params.train_sets for path in list_images(RAW_DIR / name)]
        val_images = list_images(RAW_DIR / params.val_set)
        for output in (PREPARED_DIR / "train.h5", PREPARED_DIR / "val.h5"):
            remove_stale_temporaries(output)  # left by a killed run

        started = time.perf_counter()
        # val.h5 is renamed into place only after train.h5: a failure leaves both previous files.
        with atomic_path(PREPARED_DIR / "val.h5") as val_tmp:
            write_validation_set(val_images, val_tmp, scales=params.scales)
            counts = write_training_set(
                train_images,
                PREPARED_DIR / "train.h5",
                scales=params.scales,
                downsizing=params.downsizing,
                patch_size=params.patch_size,
                stride=params.stride,
                workers=params.workers,
            )
    except (ParamsError, ImageError, WorkerError, ValueError, OSError) as error:  # OSError: disk full, read-only...
        print(f"prepare: error: {error_message(error)}", file=sys.stderr)
        return 1
    total = sum(counts.values())
    log.info(
        "prepare: %d patches (%s) from %d images in %.1f s -> %s, %s",
        total, ", ".join(f"{k}: {v}" for k, v in counts.items()), len(train_images),
        time.perf_counter() - started, PREPARED_DIR / "train.h5", PREPARED_DIR / "val.h5",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

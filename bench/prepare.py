"""Benchmark of the ``prepare`` stage: patches/s, wall time, peak RSS and HDF5 size.

Runs, each in a fresh process on the same images and params (default: the paper's 291 images,
scales 2/3/4, down-sizing 1.0/0.7/0.5, 41x41 patches):

- ``ours``: :func:`vdsr.prepare.write_training_set` as the stage runs it (streaming writer,
  ``--workers`` processes, gathered-tap resize);
- ``reference``: what common public implementations do: one process, every patch collected in
  Python lists and written at the end, imresize as dense matrix products.

    python bench/prepare.py [--raw data/raw] [--sets T91 BSD200] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

SCALES, DOWNSIZING, PATCH = [2, 3, 4], [1.0, 0.7, 0.5], 41


def run_ours(images: list[Path], out: Path, workers: int) -> int:
    from vdsr.prepare import write_training_set

    counts = write_training_set(images, out, scales=SCALES, downsizing=DOWNSIZING, patch_size=PATCH,
                                stride=PATCH, workers=workers)
    return sum(counts.values())


def run_reference(images: list[Path], out: Path, workers: int) -> int:
    from vdsr.color import modcrop, rgb2y
    from vdsr.images import read_image
    from vdsr.resize import output_size, resize_matrix

    def dense_imresize(image: np.ndarray, scale: float) -> np.ndarray:
        height, width = image.shape[:2]
        rows = resize_matrix(height, output_size(height, scale), scale)
        cols = resize_matrix(width, output_size(width, scale), scale)
        result = np.moveaxis(np.tensordot(cols, np.tensordot(rows, image.astype(np.float64), axes=(1, 0)), axes=(1, 1)), 0, 1)
        return np.clip(np.round(result), 0, 255).astype(np.uint8) if image.dtype == np.uint8 else result

    lrs, hrs, scales = [], [], []
    for path in images:
        image = read_image(path)
        for factor in DOWNSIZING:
            shrunk = image if factor == 1.0 else dense_imresize(image, factor)
            for scale in SCALES:
                hr = modcrop(rgb2y(shrunk), scale)
                lr = dense_imresize(dense_imresize(hr / 255.0, 1 / scale), scale)
                for y in range(0, hr.shape[0] - PATCH + 1, PATCH):
                    for x in range(0, hr.shape[1] - PATCH + 1, PATCH):
                        lrs.append(lr[y:y + PATCH, x:x + PATCH].astype(np.float16))
                        hrs.append(hr[y:y + PATCH, x:x + PATCH])
                        scales.append(scale)
    with h5py.File(out, "w") as h5:
        h5["lr"] = np.stack(lrs)[:, None]
        h5["hr"] = np.stack(hrs)[:, None]
        h5["scale"] = np.array(scales, np.uint8)
    return len(scales)


def child(variant: str, images: list[Path], workers: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "train.h5"
        started = time.perf_counter()
        patches = {"ours": run_ours, "reference": run_reference}[variant](images, out, workers)
        seconds = time.perf_counter() - started
        size = out.stat().st_size
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"variant": variant, "patches": patches, "seconds": seconds, "patches_per_s": patches / seconds,
                      "peak_rss_mb": peak_self, "peak_worker_rss_mb": peak_child, "h5_mb": size / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--sets", nargs="+", default=["T91", "BSD200"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["ours", "reference"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from vdsr.images import list_images

    images = [p for name in args.sets for p in list_images(args.raw / name)]
    if args.child:
        child(args.child, images, args.workers)
        return
    print(f"prepare benchmark: {len(images)} images from {', '.join(args.sets)}, scales {SCALES}, "
          f"down-sizing {DOWNSIZING}, {PATCH}x{PATCH}, {os.cpu_count()} CPUs, workers {args.workers}")
    rows = []
    for variant in args.variants:
        result = subprocess.run([sys.executable, __file__, "--child", variant, "--raw", str(args.raw), "--sets",
                                 *args.sets, "--workers", str(args.workers)], capture_output=True, text=True, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"{'variant':<10} {'patches':>8} {'seconds':>8} {'patches/s':>10} {'peak RSS MB':>12} {'worker RSS MB':>14} {'HDF5 MB':>8}")
    for r in rows:
        print(f"{r['variant']:<10} {r['patches']:>8} {r['seconds']:>8.1f} {r['patches_per_s']:>10.0f} "
              f"{r['peak_rss_mb']:>12.0f} {r['peak_worker_rss_mb']:>14.0f} {r['h5_mb']:>8.0f}")
    if len(rows) == 2:
        print(f"speed-up ours / reference: {rows[0]['patches_per_s'] / rows[1]['patches_per_s']:.1f}x")


if __name__ == "__main__":
    main()

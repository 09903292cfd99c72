"""Which schedule continues a finished release? Short equal-budget pilots from the shipped weights.

Each candidate starts from the released weights (``pretrained/vdsr.pt``, through the same
``python -m vdsr.release warm-start --new-cycle`` checkpoint that the real continuation uses), with
a fresh optimizer and one short cosine cycle of ``--steps`` steps (warm-up, peak learning rate,
down to ``min_lr``), the rest of the recipe as preset ``--preset`` gives it. The weights' moving
average (``ema_decay``) is kept beside them, so every pilot also compares averaged and raw weights.
Each is scored on Set5 (``data/prepared/val.h5``, as training validates) after each half, in exact
fp32; the released weights' own score is the first row.

    python bench/restart.py --peaks 1e-3 4e-4 1.5e-4 --steps 1000 --json out/restart.json

``--loss``, ``--batch-size``, ``--precision`` and ``--patches`` (another prepared folder's
``train.h5``: larger patches, say; validation stays ``--data``'s) vary the recipe beyond the peak;
for equal budgets keep steps x batch x patch side^2 (pixels seen) the same. Validation is exact
fp32 whatever ``--precision`` trains in.

A short cycle ranks how much a restart at a given peak disturbs and regains; it does not tell the
final value of a long one (a higher peak needs more steps to pay off), so read it as a bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from vdsr.io import sha256_file, write_json_atomic
from vdsr.prepare import load_patches, load_validation
from vdsr.release import preset_recipe, read_trained, warm_start
from vdsr.runtime import resolve_runtime
from vdsr.train import train, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("pretrained/vdsr.pt"))
    parser.add_argument("--preset", default="release-cpu-v2", help="the recipe the pilots vary")
    parser.add_argument("--peaks", type=float, nargs="+", default=[1e-3, 4e-4, 1.5e-4], help="peak learning rates")
    parser.add_argument("--steps", type=int, default=1000, help="steps of each pilot (two halves)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--data", type=Path, default=Path("data/prepared"), help="val.h5 (and train.h5)")
    parser.add_argument("--patches", type=Path, help="train.h5 from this prepared folder instead of --data's")
    parser.add_argument("--loss", choices=("l1", "l2", "mse"), help="instead of the preset's")
    parser.add_argument("--batch-size", type=int, help="instead of the preset's")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="training arithmetic (auto: bf16 where native); validation is always exact fp32")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    train_dir, val_sha256 = args.patches or args.data, sha256_file(args.data / "val.h5")
    if args.patches is not None and sha256_file(args.patches / "val.h5") != val_sha256:
        parser.error(f"{args.patches / 'val.h5'} differs from {args.data / 'val.h5'}: pilots validate on one set")
    patches = load_patches(train_dir / "train.h5")
    validation = load_validation(args.data / "val.h5")
    data_id = f"{sha256_file(train_dir / 'train.h5')}+{val_sha256}"
    runtime = resolve_runtime(torch.device("cpu"), args.precision, channels_last=True)
    base = preset_recipe(args.preset)
    varied = {"loss": args.loss, "batch_size": args.batch_size}
    base = dataclasses.replace(base, **{key: value for key, value in varied.items() if value is not None})
    label = ", ".join([f"{base.loss}", f"batch {base.batch_size}", f"{patches.hr.shape[-1]}px patches",
                       runtime.precision])
    shipped = validate(read_trained(args.model).model, validation, torch.device("cpu"))
    rows = [{"name": "shipped", "peak_lr": None, "steps": 0, "val": shipped, "val_raw": shipped}]
    print(f"shipped: {shipped}", flush=True)
    for peak in args.peaks:
        half = args.steps // 2
        recipe = dataclasses.replace(base, lr=peak, epochs=2, steps_per_epoch=half, warmup_steps=args.warmup,
                                     min_lr=min(base.min_lr, peak))
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = Path(tmp) / "last.pt"
            warm_start(args.model, checkpoint, train_dir, new_cycle=recipe)
            started = time.perf_counter()
            result = train(patches.lr, patches.hr, validation, read_trained(args.model).config, recipe,
                           runtime=runtime, checkpoint_path=checkpoint, data_id=data_id, progress=False)
        for row in result.history:
            rows.append({"name": f"peak {peak:g}, {label}", "peak_lr": peak, "steps": int(row["epoch"]) * half,
                         "val": {s: row[f"val_psnr_x{s}"] for s in validation},
                         "val_raw": {s: row.get(f"val_psnr_raw_x{s}", row[f"val_psnr_x{s}"]) for s in validation},
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print("\n| pilot | steps | Set5 x2 / x3 / x4, averaged weights | raw weights |\n|---|---|---|---|")
    for row in rows:
        fmt = lambda v: " / ".join(f"{v[s]:.2f}" for s in sorted(v))  # noqa: E731
        print(f"| {row['name']} | {row['steps']} | {fmt(row['val'])} | {fmt(row['val_raw'])} |")
    if args.json:
        write_json_atomic(args.json, {"preset": args.preset, "base": dataclasses.asdict(base), "rows": rows})


if __name__ == "__main__":
    main()

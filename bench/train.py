"""Training-step throughput (patches/s): our loop's step against a plain reference loop, in one run.

Ours is exactly what ``vdsr.train.train`` does per step: batch cut from the patch set held on the
device, flips/rotations on the device, fused SGD on CUDA, adjustable clipping (one fused call),
under each runtime lever alone and together (precision, channels_last, torch.compile; see
:mod:`vdsr.runtime`). The reference is the common PyTorch VDSR recipe: fp32, eager, NCHW, a
``DataLoader`` that reads the HDF5 file item by item through h5py, SGD, ``clip_grad_norm_``.
All time the whole step, data included, after warm-up, between device synchronisations, in
alternating rounds so that background load hits every variant alike; the best round counts.

    python bench/train.py --synthetic --json out/bench_train.json   # random patches, paper's model
    python bench/train.py --steps 5 --rounds 3                       # data/prepared/train.h5
    python bench/train.py --synthetic --compile                      # also the compiled default
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vdsr.models import ModelConfig, build_model
from vdsr.models import resolve_device
from vdsr.prepare import load_patches
from vdsr.runtime import compiled, device_description, resolve_runtime, training_flags
from vdsr.train import (
    TrainConfig,
    augment,
    batch_order,
    epoch_generator,
    get_batch,
    make_optimizer,
    place_patches,
    train_step,
)


def write_synthetic(path: Path, n: int, patch_size: int) -> None:
    """Random patches in the layout of data/prepared/train.h5."""
    rng = np.random.default_rng(0)
    shape = (n, 1, patch_size, patch_size)
    chunks = (64, 1, patch_size, patch_size)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("lr", data=rng.uniform(0.06, 0.92, shape).astype(np.float16), chunks=chunks)
        h5.create_dataset("hr", data=rng.integers(16, 236, shape, dtype=np.uint8), chunks=chunks)
        h5.create_dataset("scale", data=rng.choice(np.array([2, 3, 4], np.uint8), n))


class H5Patches(Dataset):
    """The reference's dataset: one h5py read per item, the file opened lazily in each worker."""

    def __init__(self, path: Path):
        self.path = path
        self.h5: h5py.File | None = None
        with h5py.File(path, "r") as h5:
            self.n = h5["lr"].shape[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.h5 is None:
            self.h5 = h5py.File(self.path, "r")
        lr = torch.from_numpy(self.h5["lr"][i].astype(np.float32))
        hr = torch.from_numpy(self.h5["hr"][i].astype(np.float32) / 255.0)
        return lr, hr


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step, between device synchronisations."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str
    channels_last: bool
    compile: str = "none"


def variants(device: torch.device, with_compile: bool) -> list[Variant]:
    """Each lever alone and together; the default (what ``precision: auto`` etc. select) is among them."""
    found = [Variant("fp32 NCHW", "fp32", False), Variant("fp32 channels_last", "fp32", True)]
    if resolve_runtime(device, "auto").precision == "bf16" or device.type == "cpu":
        found += [Variant("bf16 NCHW", "bf16", False), Variant("bf16 channels_last", "bf16", True)]
    if with_compile:
        default = resolve_runtime(device, "auto")
        found.append(Variant(f"{default.precision} channels_last compiled", default.precision, True, "default"))
        if device.type == "cuda":
            found.append(Variant(f"{default.precision} channels_last reduce-overhead", default.precision, True,
                                 "reduce-overhead"))
    return found


def setup_ours(path: Path, model_config: ModelConfig, args: argparse.Namespace, device: torch.device,
               variant: Variant) -> Callable[[], None]:
    """One step of ``vdsr.train.train`` (the paper's recipe: SGD, adjustable clipping) under ``variant``."""
    config = TrainConfig(batch_size=args.batch_size)
    runtime = resolve_runtime(device, variant.precision, variant.channels_last, variant.compile)
    patches = load_patches(path)
    torch.manual_seed(0)
    model = build_model(model_config).to(device, memory_format=runtime.memory_format).train()
    optimizer = make_optimizer(model, config, device)
    step_model = compiled(model, runtime)
    lr_patches, hr_patches = place_patches(patches.lr, patches.hr, device)
    total = args.warmup + args.rounds * args.steps
    generator = epoch_generator(0, 1)
    order = batch_order(len(patches.lr), total, args.batch_size, generator).to(lr_patches.device)
    transforms = torch.randint(0, 8, (total, args.batch_size), generator=generator).to(device)
    counter = iter(range(total))

    def step() -> None:
        i = next(counter)
        x, y = get_batch(lr_patches, hr_patches, order[i], device)
        x, y = augment(x, y, transforms[i])
        x = x.contiguous(memory_format=runtime.memory_format)
        with training_flags(runtime):  # our flags for our steps only, not the reference's
            train_step(step_model, optimizer, x, y, lr=config.lr, clip=config.clip,
                       clip_theta=config.clip_theta, autocast=runtime.autocast())

    return step


def setup_reference(path: Path, model_config: ModelConfig, args: argparse.Namespace,
                    device: torch.device) -> Callable[[], None]:
    """The plain loop: fp32, eager, NCHW, DataLoader over h5py items, SGD, clip_grad_norm_."""
    torch.manual_seed(0)
    model = build_model(model_config).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(H5Patches(path), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda")
    batches = iter(loader)

    def step() -> None:
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device), y.to(device)
        loss = 0.5 * F.mse_loss(model(x), y, reduction="sum") / x.shape[0]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.4)
        optimizer.step()

    return step


def profiled(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """:func:`time_steps` under torch.profiler; prints the 15 most expensive operators."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = time_steps(step, steps, device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", action="store_true", help="random patches in a temporary HDF5 file")
    parser.add_argument("--data", type=Path, default=Path("data/prepared/train.h5"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, caches)")
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds, variants alternating; best is shown")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=41, help="synthetic patches only")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=min(4, (os.cpu_count() or 2) // 2),
                        help="reference DataLoader worker processes")
    parser.add_argument("--compile", action="store_true", help="also time the default variant under torch.compile")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the default's steps")
    parser.add_argument("--json", type=Path, help="write the summary as JSON to this file")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model_config = ModelConfig("vdsr", args.depth, args.width)
    chosen = variants(device, args.compile)
    default = resolve_runtime(device, "auto")
    default_name = next(v.name for v in chosen if (v.precision, v.channels_last, v.compile)
                        == (default.precision, default.channels_last, default.compile))
    reference = f"reference (fp32 eager NCHW, DataLoader+h5py, {args.workers} workers, clip_grad_norm_)"
    seconds: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data
        if args.synthetic:
            path = Path(tmp) / "train.h5"
            n = max(2048, args.batch_size * (args.warmup + args.rounds * args.steps))
            write_synthetic(path, n, args.patch_size)
        with h5py.File(path, "r") as h5:
            patch_size = h5["lr"].shape[-1]
        steps = {} if args.skip_reference else {reference: setup_reference(path, model_config, args, device)}
        for variant in chosen:
            steps[variant.name] = setup_ours(path, model_config, args, device, variant)
        for step in steps.values():  # warm-up: compilation, cuDNN autotuning, allocator, DataLoader workers
            for _ in range(args.warmup):
                step()
        for _ in range(args.rounds):  # rounds alternate the variants, so background load hits all alike
            for name, step in steps.items():
                run = profiled if args.profile and name == default_name else time_steps
                seconds.setdefault(name, []).append(run(step, args.steps, device))

    print(f"device: {device_description(device)}; torch {torch.__version__}")
    print(f"VDSR {args.depth}x{args.width}, batch {args.batch_size}, {patch_size}x{patch_size} patches, "
          f"{'synthetic' if args.synthetic else path} data, {args.warmup} warm-up steps, best of {args.rounds} "
          f"rounds of {args.steps} timed steps; default (precision auto, channels_last): {default_name}")
    best = {name: min(values) for name, values in seconds.items()}  # least disturbed round
    base = best.get(reference)
    print(f"{'variant':<84} {'ms/step':>9} {'patches/s':>10} {'x ref':>6}")
    rows = []
    for name, value in best.items():
        ratio = f"{base / value:>6.2f}" if base else ""
        print(f"{name + (' [default]' if name == default_name else ''):<84} {value * 1e3:>9.1f} "
              f"{args.batch_size / value:>10.1f} {ratio}")
        rows.append({"name": name, "patches_per_s": round(args.batch_size / value, 2), "ms_per_step": round(value * 1e3, 1)})
    if args.json:
        summary = {"device": device_description(device), "torch": torch.__version__, "batch_size": args.batch_size,
                   "reference": reference if base else None, "variants": rows, "default": default_name}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

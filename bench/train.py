"""Training-step throughput (patches/s): our loop's step against a plain reference loop, in one run.

Ours is exactly what ``vdsr.train.train`` does per step: batch cut from the patch set held on the
device, flips/rotations on the device, channels_last + bf16 autocast + fused SGD on CUDA,
adjustable clipping. The reference is the common PyTorch VDSR recipe: fp32, eager, NCHW, a
``DataLoader`` that reads the HDF5 file item by item through h5py, SGD, ``clip_grad_norm_``.
Both time the whole step, data included, after warm-up, between device synchronisations.

    python bench/train.py --synthetic                   # random patches, paper's model
    python bench/train.py --steps 5 --depth 20          # data/prepared/train.h5
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from vdsr.models import ModelConfig, build_model
from vdsr.models import resolve_device
from vdsr.prepare import load_patches
from vdsr.train import (
    TrainConfig,
    augment,
    batch_order,
    epoch_generator,
    get_batch,
    make_optimizer,
    place_patches,
    runtime_switches,
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


def setup_ours(path: Path, model_config: ModelConfig, args: argparse.Namespace,
               device: torch.device) -> Callable[[], None]:
    """One step of ``vdsr.train.train`` (the paper's recipe: SGD, adjustable clipping)."""
    config = TrainConfig(batch_size=args.batch_size)
    patches = load_patches(path)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(model_config).to(device, memory_format=memory_format).train()
    optimizer = make_optimizer(model, config, device)
    step_model = torch.compile(model) if args.compile else model
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
        x = x.contiguous(memory_format=memory_format)
        with runtime_switches(device) as autocast:  # our flags for our steps only, not the reference's
            train_step(step_model, optimizer, x, y, lr=config.lr, clip=config.clip,
                       clip_theta=config.clip_theta, autocast=autocast)

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


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


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
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of our steps")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model_config = ModelConfig("vdsr", args.depth, args.width)
    seconds: dict[str, list[float]] = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.data
        if args.synthetic:
            path = Path(tmp) / "train.h5"
            n = max(2048, args.batch_size * (args.warmup + args.rounds * args.steps))
            write_synthetic(path, n, args.patch_size)
        with h5py.File(path, "r") as h5:
            patch_size = h5["lr"].shape[-1]
        steps = {"ours": setup_ours(path, model_config, args, device)}
        if not args.skip_reference:
            steps["reference"] = setup_reference(path, model_config, args, device)
        for step in steps.values():  # warm-up: cuDNN autotuning, allocator, DataLoader workers
            for _ in range(args.warmup):
                step()
        for _ in range(args.rounds):  # rounds alternate the variants, so background load hits both
            for key, step in steps.items():
                if args.profile and key == "ours":
                    seconds[key].append(profiled(step, args.steps, device))
                else:
                    seconds[key].append(time_steps(step, args.steps, device))

    ours_label = "bf16 autocast, channels_last, resident, fused SGD" if device.type == "cuda" else "fp32, resident"
    labels = {"ours": f"ours ({ours_label}{', compiled' if args.compile else ''})",
              "reference": f"reference (fp32 eager NCHW, DataLoader+h5py, {args.workers} workers)"}
    print(f"device: {device_name(device)}; torch {torch.__version__}")
    print(f"VDSR {args.depth}x{args.width}, batch {args.batch_size}, {patch_size}x{patch_size} patches, "
          f"{'synthetic' if args.synthetic else path} data, {args.warmup} warm-up steps, best of {args.rounds} "
          f"rounds of {args.steps} timed steps")
    print(f"{'variant':<72} {'ms/step':>9} {'patches/s':>10}")
    best = {key: min(values) for key, values in seconds.items() if values}  # least disturbed round
    for key, value in best.items():
        print(f"{labels[key]:<72} {value * 1e3:>9.1f} {args.batch_size / value:>10.0f}")
    if "reference" in best:
        print(f"speed-up of ours: {best['reference'] / best['ours']:.2f}x")


if __name__ == "__main__":
    main()

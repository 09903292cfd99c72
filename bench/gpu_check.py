"""GPU acceptance: run once on a machine with one GPU, then read the JSON summary it writes.

    cp -r <the downloaded images> data/raw       # T91, BSD200, Set5 as `dvc repro download` lays them out
    python bench/gpu_check.py --out out/gpu_check.json          # one H100/H200: about 5 minutes
    python bench/gpu_check.py --device cpu --tiny --raw DIR --out FILE   # the test suite's run (seconds)

What it checks, in order:
1. **sync**: a few training steps of our loop under ``torch.cuda.set_sync_debug_mode("error")``: any
   host-device synchronisation in the step raises (CUDA only; "not applicable" on the CPU).
2. **speed**: our step (the defaults: ``precision: auto``, channels_last; and compiled, with CUDA
   graphs on the GPU) against the reference loop of ``bench/train.py`` side by side on the same
   device: patches/s, the speed-up, MFU from the counted FLOPs (:func:`train_flops_per_patch`)
   against the GPU's dense bf16 peak, and peak memory.
3. **quality**: trains the default runtime and fp32 for the same number of steps (about
   ``--train-seconds`` each) on patches cut from ``--raw``, evaluates Set5 x2/x3/x4 in exact fp32
   and reports each and their difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vdsr import evaluate
from vdsr.images import list_images, read_image
from vdsr.models import ModelConfig, resolve_device
from vdsr.prepare import load_patches, load_validation, write_training_set, write_validation_set
from vdsr.runtime import device_description, resolve_runtime
from vdsr.train import TrainConfig, train
from vdsr.inference import model_upscaler

HERE = Path(__file__).resolve().parent
# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by a substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10": 125e12, "RTX 4090": 165e12}
FAST_RECIPE = dict(optimizer="adam", lr=1e-3, lr_schedule="cosine", min_lr=1e-5, warmup_steps=50, loss="mse",
                   clip="norm", clip_theta=1.0, weight_decay=0.0)


def bench_module() -> Any:
    """bench/train.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_train", HERE / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def train_flops_per_patch(config: ModelConfig, patch: int) -> float:
    """FLOPs of one training step per patch: 3x the forward pass (backward: grads of inputs and
    weights), the forward being 2 x 9 x (1 x w + (d - 2) x w^2 + w x 1) per pixel for VDSR d x w."""
    w, d = config.width, config.depth
    return 3 * 2 * 9 * (2 * w + (d - 2) * w * w) * patch * patch


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def driver_version() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or None


def check_sync(step: Any, device: torch.device, steps: int = 3) -> str:
    """Run ``steps`` steps with CUDA's sync debug mode set to error; "passed" or the error."""
    if device.type != "cuda":
        return "not applicable (cpu)"
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step()
    except RuntimeError as error:
        return f"failed: {error}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return "passed"


def speed(bench: Any, path: Path, model_config: ModelConfig, args: argparse.Namespace,
          device: torch.device) -> dict[str, Any]:
    """Our step in each default variant against the reference, side by side, alternating rounds."""
    default = resolve_runtime(device, "auto")
    variants = [bench.Variant("ours (defaults)", default.precision, True)]
    if not args.no_compile:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        variants.append(bench.Variant(f"ours (defaults, compile {mode})", default.precision, True, mode))
    options = argparse.Namespace(batch_size=args.batch_size, warmup=args.warmup, rounds=args.rounds, steps=args.steps,
                                 workers=args.workers)
    steps = {"reference": bench.setup_reference(path, model_config, options, device)}
    for variant in variants:
        steps[variant.name] = bench.setup_ours(path, model_config, options, device, variant)
    sync = check_sync(steps["ours (defaults)"], device)
    peaks = {}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    for _ in range(args.rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds[name].append(bench.time_steps(step, args.steps, device))
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
    flops, peak = train_flops_per_patch(model_config, args.patch_size), peak_flops(device)
    rows = {}
    for name, values in seconds.items():
        rate = args.batch_size / min(values)
        rows[name] = {"patches_per_s": round(rate, 1), "ms_per_step": round(min(values) * 1e3, 2),
                      "tflops": round(rate * flops / 1e12, 3),
                      "mfu": round(rate * flops / peak, 4) if peak else None,
                      "peak_memory_mb": round(peaks[name] / 2**20, 1) if name in peaks else None}
    best = max((name for name in rows if name != "reference"), key=lambda name: rows[name]["patches_per_s"])
    return {"sync_check": sync, "variants": rows, "best": best, "peak_bf16_flops": peak,
            "speedup_vs_reference": round(rows[best]["patches_per_s"] / rows["reference"]["patches_per_s"], 2)}


def quality(raw: Path, work: Path, model_config: ModelConfig, args: argparse.Namespace, device: torch.device,
            patches_per_s: float) -> dict[str, Any]:
    """Train the default runtime and fp32 for the same steps on patches from ``raw``; Set5 PSNR of each."""
    train_dirs = [raw / name for name in ("T91", "BSD200") if (raw / name).is_dir()] or [raw / "Set5"]
    images = [path for folder in train_dirs for path in list_images(folder)]
    scales = [2, 3, 4]
    started = time.perf_counter()
    write_training_set(images, work / "train.h5", scales=scales, downsizing=[1.0, 0.7, 0.5], patch_size=41,
                       stride=41, workers=args.workers)
    write_validation_set(list_images(raw / "Set5"), work / "val.h5", scales=scales)
    prepare_s = time.perf_counter() - started
    patches = load_patches(work / "train.h5")
    validation = load_validation(work / "val.h5")
    steps = max(10, int(args.train_seconds * patches_per_s / args.batch_size))
    config = TrainConfig(**FAST_RECIPE, epochs=1, batch_size=args.batch_size, steps_per_epoch=steps)
    set5 = [(path.stem, read_image(path)) for path in list_images(raw / "Set5")]
    result: dict[str, Any] = {"train_images": len(images), "patches": len(patches.lr), "prepare_s": round(prepare_s, 1),
                              "steps": steps, "recipe": {**FAST_RECIPE, "batch_size": args.batch_size}}
    for precision in dict.fromkeys([resolve_runtime(device, "auto").precision, "fp32"]):
        runtime = resolve_runtime(device, precision, channels_last=True)
        started = time.perf_counter()
        trained = train(patches.lr, patches.hr, validation, model_config, config, runtime=runtime, progress=False)
        seconds = time.perf_counter() - started
        table = evaluate.evaluate_images(set5, scales, model_upscaler(trained.model, device))
        result[precision] = {"train_s": round(seconds, 1),
                             **{key: round(value["psnr"], 3) for key, value in table.items()}}
    if "bf16" in result:
        result["bf16_minus_fp32_db"] = {key: round(result["bf16"][key] - result["fp32"][key], 3)
                                        for key in ("x2", "x3", "x4")}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="T91, BSD200, Set5 folders of images")
    parser.add_argument("--out", type=Path, default=Path("out/gpu_check.json"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps: checks the script itself")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    parser.add_argument("--train-seconds", type=float, default=60.0, help="quality: training time per precision")
    parser.add_argument("--workers", type=int, default=8, help="prepare processes and reference DataLoader workers")
    args = parser.parse_args()
    args.batch_size, args.patch_size = 64, 41
    args.warmup, args.rounds, args.steps = (1, 1, 2) if args.tiny else (10, 3, 50)
    if args.tiny:
        args.train_seconds = min(args.train_seconds, 2.0)
    if not (args.raw / "Set5").is_dir():
        print(f"gpu_check: error: {args.raw / 'Set5'} is missing: copy the images there (README 'GPU check')",
              file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    model_config = ModelConfig("vdsr", 3, 8) if args.tiny else ModelConfig("vdsr", 20, 64)
    summary: dict[str, Any] = {
        "device": device_description(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "driver": driver_version(), "model": f"VDSR {model_config.depth}x{model_config.width}",
        "batch_size": args.batch_size, "default_precision": resolve_runtime(device, "auto").precision,
    }
    started = time.perf_counter()
    bench = bench_module()
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = Path(tmp) / "synthetic.h5"
        bench.write_synthetic(synthetic, 4096, args.patch_size)
        summary["speed"] = speed(bench, synthetic, model_config, args, device)
        print(json.dumps(summary["speed"], indent=2), flush=True)
        rate = summary["speed"]["variants"]["ours (defaults)"]["patches_per_s"]
        summary["quality"] = quality(args.raw, Path(tmp), model_config, args, device, rate)
    summary["elapsed_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["quality"], indent=2))
    print(f"gpu_check: {summary['speed']['sync_check']}; {summary['speed']['speedup_vs_reference']}x the reference; "
          f"wrote {args.out} in {summary['elapsed_s']:.0f} s")
    return 0 if not summary["speed"]["sync_check"].startswith("failed") else 1


if __name__ == "__main__":
    sys.exit(main())

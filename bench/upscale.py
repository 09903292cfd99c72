"""The network pass of ``vdsr upscale`` per output megapixel, every variant side by side in one run,
against the exact fp32 eager NCHW reference and against this machine's measured peak.

Variants are :func:`vdsr.backends.all_variants`: the backends and precisions ``vdsr upscale
--backend/--precision`` can select (PyTorch eager NCHW and channels_last in fp32 and bf16,
``torch.compile``, ONNX Runtime on the exported model, OpenVINO fp32/bf16 with the extra
``openvino``); one that cannot run here is skipped with the reason. For each:

* **speed**: seconds per output megapixel of the network pass as ``vdsr upscale`` runs it (tiles of
  ``--tile`` with the receptive-field overlap, :func:`vdsr.inference.predict_y`) on the bicubic luma
  of a ``--megapixels`` picture at x2, x3 and x4, after one untimed warm-up pass; variants alternate
  within each round, so background load hits all alike; the best of ``--rounds`` counts;
* **GFLOP/s**: the model's FLOPs per output pixel (``torch.utils.flop_counter``, on the reference)
  times the output pixels, over the time: useful work only, the tiles' overlap counts as cost;
* **quality**: mean PSNR (the project's protocol, :mod:`vdsr.evaluate`: Y of the mod-cropped HR
  image, MATLAB bicubic degradation, uint8 rounding, ``crop_border = scale``) on each ``--sets``
  folder at each scale, minus the reference's; the largest absolute difference is reported.

The machine's peak: a 3x3, 64 to 64 channel convolution (VDSR's body layer) on a
``--peak-side`` square, fp32 (exact) and bf16 (autocast), NCHW and channels_last, the faster of the
two layouts; measured in the same run, between the variants' rounds.

The default shown is the fastest variant within ``--tolerance`` dB (0.02) of the reference on every
set and scale: what ``vdsr upscale --backend auto`` is chosen from (vdsr/backends.py ``AUTO_ORDER``,
``DEFAULT_PRECISIONS``; docs/upscaling-speed.md says why onnxruntime, within noise of openvino,
is not picked). The JSON's ``shipped_default`` is what ``auto`` resolves to here.

    python bench/upscale.py --json out/bench_upscale.json                    # 2 MP, Set5 and Set14
    python bench/upscale.py --megapixels 0.05 --quality-crop 64 --rounds 2    # a quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vdsr import backends, inference
from vdsr.evaluate import degrade, hr_luma, to_uint8
from vdsr.images import list_images, read_image
from vdsr.metrics import psnr
from vdsr.models import load_model
from vdsr.resize import imresize
from vdsr.runtime import device_description, exact_fp32

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VDSR_DATA_MIRROR", REPO.parent / "shared" / "datasets")) / "data"
SCALES = (2, 3, 4)
TOLERANCE_DB = 0.02


@dataclass
class Measured:
    """One variant's results: seconds per output megapixel by scale, mean PSNR by (set, scale)."""

    variant: backends.Variant
    upscaler: Callable[[np.ndarray, int], np.ndarray]
    seconds: dict[int, list[float]] = field(default_factory=dict)
    psnr: dict[tuple[str, int], float] = field(default_factory=dict)

    def seconds_per_megapixel(self) -> float:
        """Mean over scales of each scale's best round."""
        return float(np.mean([min(values) for values in self.seconds.values()]))


# --- inputs -------------------------------------------------------------------------------------


def output_side(megapixels: float) -> int:
    """The timed picture's output side: about ``megapixels`` square, a multiple of 12 (so of 2, 3, 4)."""
    return max(12, round(math.sqrt(megapixels * 1e6) / 12) * 12)


def timing_luma(megapixels: float, scale: int, seed: int = 0) -> np.ndarray:
    """The network's input for a ``megapixels`` output at ``scale``: a smooth random LR luma
    (noise on a bicubic-blurred coarse grid, as bench/upscale_memory.py's picture), bicubic-upscaled
    by ``scale`` (MATLAB imresize); the output side is a multiple of 12, so every scale gets the same."""
    side = output_side(megapixels)
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.1, 0.9, (side // scale // 8 + 1, side // scale // 8 + 1))
    low = imresize(coarse, 8.0)[: side // scale, : side // scale]
    low = np.clip(low + rng.uniform(-0.05, 0.05, low.shape), 0.0, 1.0)
    return imresize(low, float(scale))


def centre_crop(image: np.ndarray, side: int) -> np.ndarray:
    """The central ``side`` x ``side`` part of an (H, W[, 3]) image (all of it if ``side`` is 0 or larger)."""
    if not side:
        return image
    top, left = max(0, (image.shape[0] - side) // 2), max(0, (image.shape[1] - side) // 2)
    return image[top : top + side, left : left + side]


def quality_inputs(sets: list[Path], scales: tuple[int, ...], crop: int) -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """(set name, scale, HR luma uint8, network input float64) for every image of every set and scale:
    :func:`vdsr.evaluate.hr_luma` and :func:`vdsr.evaluate.degrade`, as evaluation computes them."""
    found = []
    for folder in sets:
        paths = list_images(folder)
        if not paths:
            raise SystemExit(f"--sets {folder}: no images in this folder")
        for path in paths:
            image = centre_crop(read_image(path), crop)
            for scale in scales:
                hr_y = hr_luma(image, scale)
                found.append((folder.name, scale, hr_y, degrade(hr_y, scale)))
    return found


# --- the machine's peak -------------------------------------------------------------------------


def conv_peak(side: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of a 3x3 64->64 convolution on a (1, 64, side, side) input, fp32 (exact) and bf16
    (autocast), each the faster of NCHW and channels_last, best of ``repeats`` after a warm-up."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    flops = 2 * 64 * 64 * 9 * side * side
    peaks: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        best = math.inf
        for layout in (torch.contiguous_format, torch.channels_last):
            layer = conv.to(memory_format=layout)
            x = torch.rand(1, 64, side, side).contiguous(memory_format=layout)
            with inference.network_numerics(torch.device("cpu"), precision):
                layer(x)
                for _ in range(repeats):
                    start = time.perf_counter()
                    layer(x)
                    best = min(best, time.perf_counter() - start)
        peaks[precision] = round(flops / best / 1e9, 2)
    return peaks


def flops_per_pixel(model: torch.nn.Module) -> float:
    """The model's FLOPs per output pixel, counted by ``torch.utils.flop_counter`` on a 64x64 input."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, exact_fp32(), torch.inference_mode():
        model(torch.zeros(1, 1, 64, 64))
    return counter.get_total_flops() / 64**2


# --- the run ------------------------------------------------------------------------------------


def prepare(model: torch.nn.Module, names: list[str] | None, tile: int) -> tuple[list[Measured], list[dict]]:
    """The variants that can run here (:func:`vdsr.backends.variant_upscaler`), and the others with the reason."""
    ready, skipped = [], []
    for variant in backends.all_variants():
        if names and variant.name not in names and variant != backends.REFERENCE:
            continue
        try:
            ready.append(Measured(variant, backends.variant_upscaler(model, torch.device("cpu"), variant, tile=tile)))
        except Exception as error:  # noqa: BLE001 -- a missing extra, an exporter failure: report, go on
            skipped.append({"name": variant.name, "reason": f"{type(error).__name__}: {error}"})
            print(f"skipped {variant.name}: {skipped[-1]['reason']}", flush=True)
    return ready, skipped


def warm_up(measured: list[Measured], luma: np.ndarray) -> list[dict]:
    """One untimed pass each (compilation, oneDNN primitive caches); a variant that fails is dropped."""
    failed = []
    for entry in list(measured):
        start = time.perf_counter()
        try:
            entry.upscaler(luma, 2)
        except Exception as error:  # noqa: BLE001 -- a compiler failure: report, go on
            measured.remove(entry)
            failed.append({"name": entry.variant.name, "reason": f"{type(error).__name__}: {error}"})
            print(f"skipped {entry.variant.name}: {failed[-1]['reason']}", flush=True)
            continue
        print(f"warm-up {entry.variant.name}: {time.perf_counter() - start:.1f} s", flush=True)
    return failed


def time_round(measured: list[Measured], pictures: dict[int, np.ndarray]) -> None:
    """One timed pass of every variant on every scale's picture, variants alternating."""
    for scale, luma in pictures.items():
        megapixels = luma.size / 1e6
        for entry in measured:
            start = time.perf_counter()
            entry.upscaler(luma, scale)
            seconds = (time.perf_counter() - start) / megapixels
            entry.seconds.setdefault(scale, []).append(seconds)
            print(f"  x{scale} {entry.variant.name:<22} {seconds:9.1f} s/MP", flush=True)


def measure_quality(measured: list[Measured], inputs: list[tuple[str, int, np.ndarray, np.ndarray]]) -> None:
    """Mean PSNR per (set, scale) of every variant, image by image, variants alternating."""
    totals: dict[tuple[str, tuple[str, int]], list[float]] = {}
    for set_name, scale, hr_y, bicubic in inputs:
        for entry in measured:
            estimate = to_uint8(entry.upscaler(bicubic, scale))
            totals.setdefault((entry.variant.name, (set_name, scale)), []).append(
                psnr(estimate, hr_y, crop_border=scale))
    for entry in measured:
        for (name, key), values in totals.items():
            if name == entry.variant.name:
                entry.psnr[key] = float(np.mean(values))


def summarise(measured: list[Measured], flops: float, tolerance: float) -> tuple[list[dict], str]:
    """The JSON rows (speed, largest PSNR difference from the reference, GFLOP/s) and the default's name."""
    reference = next(m for m in measured if m.variant == backends.REFERENCE)
    rows = []
    for entry in measured:
        deltas = {f"{s} x{k}": entry.psnr[(s, k)] - reference.psnr[(s, k)] for s, k in reference.psnr}
        seconds = entry.seconds_per_megapixel()
        rows.append({
            "name": entry.variant.name,
            "seconds_per_megapixel": round(seconds, 3),
            "psnr_delta_db": round(max((abs(d) for d in deltas.values()), default=0.0), 4),
            "gflops": float(f"{flops * 1e6 / seconds / 1e9:.4g}"),  # 4 significant digits: tiny models too
            "speedup": round(reference.seconds_per_megapixel() / seconds, 2),
            "seconds_per_megapixel_by_scale": {f"x{k}": round(min(v), 3) for k, v in entry.seconds.items()},
            "psnr_delta_db_by_set_scale": {key: round(d, 4) for key, d in deltas.items()},
        })
    eligible = [row for row in rows if row["psnr_delta_db"] <= tolerance]
    return rows, min(eligible, key=lambda row: row["seconds_per_megapixel"])["name"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "pretrained" / "vdsr.pt", help="model file")
    parser.add_argument("--megapixels", type=float, default=2.0, help="output megapixels of the timed picture")
    parser.add_argument("--scales", type=int, nargs="+", default=list(SCALES), choices=SCALES)
    parser.add_argument("--sets", type=Path, nargs="+", default=[DATA / "set5", DATA / "set14"],
                        help="folders of HR images for the PSNR differences (default: Set5 and Set14)")
    parser.add_argument("--quality-crop", type=int, default=0,
                        help="PSNR on the central N x N part of each image only (0: whole images)")
    parser.add_argument("--variants", nargs="+", help="names to run, e.g. 'torch bf16' (the reference always runs)")
    parser.add_argument("--tile", type=int, default=inference.DEFAULT_TILE)
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds, variants alternating; best counts")
    parser.add_argument("--peak-side", type=int, default=128, help="side of the peak convolution's input")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE_DB, help="dB from the reference for the default")
    parser.add_argument("--json", type=Path, help="write the summary as JSON to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    known = [variant.name for variant in backends.all_variants()]
    for name in args.variants or []:
        if name not in known:
            raise SystemExit(f"--variants {name!r}: expected one of {', '.join(repr(k) for k in known)}")
    for folder in args.sets:
        if not folder.is_dir():
            raise SystemExit(f"--sets {folder}: not a folder (expected HR images, e.g. Set5)")
    model, config, _meta = load_model(args.model, map_location="cpu")
    model.eval()
    flops = flops_per_pixel(model)
    measured, skipped = prepare(model, args.variants, args.tile)
    skipped += warm_up(measured, timing_luma(0.01, 2))
    pictures = {scale: timing_luma(args.megapixels, scale) for scale in args.scales}
    peaks: list[dict[str, float]] = []
    for index in range(args.rounds):
        print(f"round {index + 1} of {args.rounds}", flush=True)
        time_round(measured, pictures)
        peaks.append(conv_peak(args.peak_side, 3))
    measure_quality(measured, quality_inputs(args.sets, tuple(args.scales), args.quality_crop))
    peak = {precision: max(p[precision] for p in peaks) for precision in ("fp32", "bf16")}
    rows, default = summarise(measured, flops, args.tolerance)
    report(args, config, rows, default, peak, skipped, flops)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, and the CPUs: the background the figures were taken in."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def report(args: argparse.Namespace, config, rows: list[dict], default: str, peak: dict[str, float],
           skipped: list[dict], flops: float) -> None:
    """Print the table and write ``--json``."""
    device = device_description(torch.device("cpu"))
    side = output_side(args.megapixels)
    print(f"device: {device}; torch {torch.__version__}; load average {load_average()}")
    print(f"{config.name} {config.depth}x{config.width}: {flops / 1e6:.3f} MFLOP per output pixel; "
          f"{side}x{side} output at x{'/x'.join(map(str, args.scales))}, tile {args.tile}, best of {args.rounds}; "
          f"PSNR on {', '.join(s.name for s in args.sets)}"
          f"{f' (central {args.quality_crop}px)' if args.quality_crop else ''}")
    print(f"peak of a 3x3 64-channel convolution: fp32 {peak['fp32']} GFLOP/s, bf16 {peak['bf16']} GFLOP/s")
    print(f"{'variant':<24} {'s/MP':>9} {'x ref':>6} {'GFLOP/s':>8} {'% peak':>7} {'max |dPSNR| dB':>15}")
    for row in rows:
        share = 100 * row["gflops"] / peak["bf16" if row["name"].endswith("bf16") else "fp32"]
        mark = " [default]" if row["name"] == default else ""
        print(f"{row['name']:<24} {row['seconds_per_megapixel']:>9.2f} {row['speedup']:>6.2f} {row['gflops']:>8.2f} "
              f"{share:>6.0f}% {row['psnr_delta_db']:>15.4f}{mark}")
    for entry in skipped:
        print(f"{entry['name']:<24} skipped: {entry['reason']}")
    if args.json:
        summary = {"device": device, "torch": torch.__version__, "load_average": load_average(),
                   "reference": backends.REFERENCE.name, "default": default,
                   "shipped_default": backends.resolve_variant().name, "variants": rows, "peak_gflops": peak,
                   "skipped": skipped, "megapixels": round(side * side / 1e6, 4), "scales": args.scales,
                   "quality_sets": [s.name for s in args.sets], "quality_crop": args.quality_crop,
                   "flop_per_pixel": round(flops), "rounds": args.rounds, "tile": args.tile}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

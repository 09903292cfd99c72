"""Evaluation on a set of HR images: the one place that turns an upscaler into PSNR/SSIM numbers.

The protocol is SRCNN's and VDSR's MATLAB demo, which reproduces the papers' bicubic column to
the hundredth of a dB (Set5 x2: 33.66 dB / 0.9299):

1. HR luma ``Y`` = MATLAB ``rgb2ycbcr`` of the uint8 image, uint8 (grayscale images: as is),
   mod-cropped to a multiple of the scale;
2. network input = ``imresize(imresize(Y / 255, 1/s), s)`` in float64 (:func:`degrade`);
3. the upscaler maps that (H, W) float Y in [0, 1] to its estimate of HR Y;
4. the estimate is clipped and rounded to uint8 (:func:`to_uint8`), then PSNR/SSIM against HR Y
   with ``crop_border = s``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tqdm import tqdm

from vdsr.color import modcrop, rgb2y
from vdsr.images import ImageError, list_images, read_image
from vdsr.metrics import SSIM_WINDOW, psnr, ssim
from vdsr.resize import imresize

# (bicubic-upscaled Y in [0, 1] of shape (H, W), scale) -> estimated HR Y in [0, 1], (H, W)
Upscaler = Callable[[np.ndarray, int], np.ndarray]


def hr_luma(image: np.ndarray, scale: int) -> np.ndarray:
    """uint8 HR luma of an RGB (H, W, 3) or gray (H, W) uint8 image, mod-cropped to ``scale``."""
    return modcrop(rgb2y(image), scale)


def degrade(hr_y: np.ndarray, scale: int) -> np.ndarray:
    """VDSR's input: uint8 HR luma -> float64 ``imresize(imresize(Y/255, 1/s), s)``, same size.

    ``hr_y`` must already be mod-cropped (see :func:`hr_luma`), so that the size round-trips.
    """
    if hr_y.shape[0] % scale or hr_y.shape[1] % scale:
        raise ValueError(f"HR size {hr_y.shape} is not a multiple of scale {scale}: mod-crop it first")
    low = imresize(hr_y.astype(np.float64) / 255.0, 1.0 / scale)
    return imresize(low, float(scale))


def to_uint8(y: np.ndarray) -> np.ndarray:
    """Y in [0, 1] (float) -> uint8 [0, 255], clipped and rounded (MATLAB ``uint8(y * 255)``)."""
    return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)


def bicubic_upscaler(bicubic_y: np.ndarray, scale: int) -> np.ndarray:
    """The bicubic baseline: the network input is already the bicubic estimate."""
    return bicubic_y


def check_evaluable(image: np.ndarray, scale: int, source: str) -> None:
    """Raise :class:`ImageError` naming ``source`` if the image is too small to measure at ``scale``."""
    height, width = image.shape[:2]
    if min(height - height % scale, width - width % scale) - 2 * scale < SSIM_WINDOW:
        raise ImageError(
            f"{source}: image is {width}x{height}, too small to evaluate at x{scale} "
            f"(SSIM needs {SSIM_WINDOW}x{SSIM_WINDOW} pixels after shaving {scale} on each side)"
        )


def evaluate_images(
    images: Sequence[tuple[str, np.ndarray]], scales: Sequence[int], upscaler: Upscaler, progress: str | None = None
) -> dict[str, dict]:
    """Mean and per-image PSNR/SSIM for each scale.

    ``images`` are (name, uint8 RGB or gray array). Returns
    ``{"x2": {"psnr": mean, "ssim": mean, "images": {name: {"psnr": .., "ssim": ..}}}, ...}``.
    ``progress``: label of a progress bar over images x scales (None: no bar).
    """
    results: dict[str, dict] = {}
    bar = tqdm(total=len(images) * len(scales), desc=progress, unit="image", disable=progress is None)
    for scale in scales:
        per_image = {}
        for name, image in images:
            bar.set_postfix_str(f"x{scale} {name}", refresh=False)
            check_evaluable(image, scale, name)
            hr_y = hr_luma(image, scale)
            estimate = to_uint8(upscaler(degrade(hr_y, scale), scale))
            per_image[name] = {
                "psnr": psnr(estimate, hr_y, crop_border=scale),
                "ssim": ssim(estimate, hr_y, crop_border=scale),
            }
            bar.update()
        results[f"x{scale}"] = {
            "psnr": float(np.mean([m["psnr"] for m in per_image.values()])),
            "ssim": float(np.mean([m["ssim"] for m in per_image.values()])),
            "images": per_image,
        }
    bar.close()
    return results


def evaluate_folder(
    folder: str | Path, scales: Sequence[int], upscaler: Upscaler, progress: str | None = None
) -> dict[str, dict]:
    """:func:`evaluate_images` over every image file of ``folder`` (sorted by name)."""
    images = []
    for path in list_images(folder):
        image = read_image(path)
        for scale in scales:
            check_evaluable(image, scale, str(path))
        images.append((path.stem, image))
    return evaluate_images(images, scales, upscaler, progress)


def summary(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Drop per-image entries: ``{"x2": {"psnr": .., "ssim": ..}}`` as in the metrics files."""
    return {scale: {"psnr": round(r["psnr"], 4), "ssim": round(r["ssim"], 4)} for scale, r in results.items()}


def format_table(table: dict[str, dict[str, dict[str, float]]]) -> str:
    """Plain-text table of ``{dataset: {"x2": {"psnr", "ssim"}}}``."""
    lines = [f"{'set':<10} {'scale':>5} {'PSNR (dB)':>10} {'SSIM':>7}"]
    for dataset, by_scale in table.items():
        for scale, m in by_scale.items():
            lines.append(f"{dataset:<10} {scale:>5} {m['psnr']:>10.2f} {m['ssim']:>7.4f}")
    return "\n".join(lines)

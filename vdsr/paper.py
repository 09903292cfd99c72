"""Our results beside the paper's: its Table 3, the Markdown results table, comparison figures.

Kim, Lee, Lee, "Accurate Image Super-Resolution Using Very Deep Convolutional Networks", CVPR
2016, Table 3: PSNR (dB) / SSIM on the Y channel with a border of ``scale`` pixels shaved, models
trained on 291 images (T91 + BSD200). Copied from ``shared/reference/paper_tables.md``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

METHODS = ("bicubic", "srcnn", "vdsr")

# {set: {"x<scale>": {method: (psnr, ssim)}}}
TABLE3: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "Set5": {
        "x2": {"bicubic": (33.66, 0.9299), "srcnn": (36.66, 0.9542), "vdsr": (37.53, 0.9587)},
        "x3": {"bicubic": (30.39, 0.8682), "srcnn": (32.75, 0.9090), "vdsr": (33.66, 0.9213)},
        "x4": {"bicubic": (28.42, 0.8104), "srcnn": (30.48, 0.8628), "vdsr": (31.35, 0.8838)},
    },
    "Set14": {
        "x2": {"bicubic": (30.24, 0.8688), "srcnn": (32.42, 0.9063), "vdsr": (33.03, 0.9124)},
        "x3": {"bicubic": (27.55, 0.7742), "srcnn": (29.28, 0.8209), "vdsr": (29.77, 0.8314)},
        "x4": {"bicubic": (26.00, 0.7027), "srcnn": (27.49, 0.7503), "vdsr": (28.01, 0.7674)},
    },
    "B100": {
        "x2": {"bicubic": (29.56, 0.8431), "srcnn": (31.36, 0.8879), "vdsr": (31.90, 0.8960)},
        "x3": {"bicubic": (27.21, 0.7385), "srcnn": (28.41, 0.7863), "vdsr": (28.82, 0.7976)},
        "x4": {"bicubic": (25.96, 0.6675), "srcnn": (26.90, 0.7101), "vdsr": (27.29, 0.7251)},
    },
    "Urban100": {
        "x2": {"bicubic": (26.88, 0.8403), "srcnn": (29.50, 0.8946), "vdsr": (30.76, 0.9140)},
        "x3": {"bicubic": (24.46, 0.7349), "srcnn": (26.24, 0.7989), "vdsr": (27.14, 0.8279)},
        "x4": {"bicubic": (23.14, 0.6577), "srcnn": (24.52, 0.7221), "vdsr": (25.18, 0.7524)},
    },
}

Table = dict[str, dict[str, dict[str, float]]]  # {set: {"x2": {"psnr": .., "ssim": ..}}}, the metrics files


def _cell(psnr: float | None, ssim: float | None) -> str:
    return "–" if psnr is None or ssim is None else f"{psnr:.2f} / {ssim:.4f}"


def results_table(model: Table, bicubic: Table, model_label: str) -> str:
    """Markdown table: our bicubic, the model, the paper's bicubic/SRCNN/VDSR and the gap to VDSR.

    Rows follow ``model``; a value missing from ``bicubic`` or the paper shows as "–".
    """
    header = (
        f"| set | scale | bicubic (ours) | {model_label} (ours) | bicubic (paper) | SRCNN (paper) "
        "| VDSR (paper) | ours − paper VDSR (dB) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for dataset, by_scale in model.items():
        for scale, ours in by_scale.items():
            base = bicubic.get(dataset, {}).get(scale, {})
            paper = TABLE3.get(dataset, {}).get(scale, {})
            cells = [_cell(base.get("psnr"), base.get("ssim")), _cell(ours["psnr"], ours["ssim"])]
            cells += [_cell(*paper[m]) if m in paper else "–" for m in METHODS]
            gap = f"{ours['psnr'] - paper['vdsr'][0]:+.2f}" if "vdsr" in paper else "–"
            lines.append(f"| {dataset} | {scale} | {' | '.join(cells)} | {gap} |")
    return "\n".join(lines) + "\n"


# --- comparison figures --------------------------------------------------------------------------


def centre_crop_box(height: int, width: int, fraction: float = 0.25) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of a square of side ``fraction * min(H, W)`` at the image centre."""
    side = max(8, int(min(height, width) * fraction))
    top, left = (height - side) // 2, (width - side) // 2
    return top, left, top + side, left + side


def comparison_figure(panels: list[tuple[str, np.ndarray]], box: tuple[int, int, int, int]) -> Image.Image:
    """Images side by side, each with ``box`` outlined, over the same region enlarged (nearest neighbour).

    ``panels``: (label, uint8 (H, W, 3) RGB or (H, W) gray), all the same size.
    """
    height, width = panels[0][1].shape[:2]
    top, left, bottom, right = box
    zoom = max(1, width // (right - left))
    crop_h, crop_w = (bottom - top) * zoom, (right - left) * zoom
    gap, label_h = 8, 18
    figure = Image.new("RGB", (len(panels) * (width + gap) - gap, label_h + height + gap + crop_h), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    for i, (label, pixels) in enumerate(panels):
        if pixels.shape[:2] != (height, width):
            raise ValueError(f"panel {label!r} is {pixels.shape[:2]}, expected {(height, width)}")
        image = Image.fromarray(pixels).convert("RGB")
        x = i * (width + gap)
        draw.text((x + 2, 2), label, fill="black", font=font)
        figure.paste(image, (x, label_h))
        draw.rectangle((x + left, label_h + top, x + right - 1, label_h + bottom - 1), outline=(255, 0, 0), width=2)
        crop = image.crop((left, top, right, bottom)).resize((crop_w, crop_h), Image.Resampling.NEAREST)
        figure.paste(crop, (x, label_h + height + gap))
    return figure

"""Our results beside the paper's: its Table 3, the Markdown results table, gains, comparison panels.

Kim, Lee, Lee, "Accurate Image Super-Resolution Using Very Deep Convolutional Networks", CVPR
2016, Table 3: PSNR (dB) / SSIM on the Y channel with a border of ``scale`` pixels shaved, models
trained on 291 images (T91 + BSD200). Copied from ``shared/reference/paper_tables.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

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

# Published VDSR reimplementations (PSNR x2/x3/x4; ``shared/reference/paper_tables.md``): trained on GPUs.
# "twtygqyy" is the de facto PyTorch VDSR's shipped weights evaluated with this project's code.
REIMPLEMENTATIONS: dict[str, dict[str, dict[str, float]]] = {
    "caffe-vdsr": {"Set5": {"x2": 37.46, "x3": 33.52, "x4": 31.14}, "Set14": {"x2": 32.83, "x3": 29.55, "x4": 27.81},
                   "B100": {"x2": 31.65, "x3": 28.62, "x4": 27.13}},
    "Lornatang": {"Set5": {"x2": 37.41, "x3": 33.44, "x4": 31.05}},
    "twtygqyy": {"Set5": {"x2": 37.59, "x3": 33.75, "x4": 31.43}, "Set14": {"x2": 33.04, "x3": 29.84, "x4": 28.08},
                 "B100": {"x2": 31.91, "x3": 28.85, "x4": 27.29}},
}
GPU_REIMPLEMENTATIONS = ("caffe-vdsr", "Lornatang")  # the release must beat both on Set5

Table = dict[str, dict[str, dict[str, float]]]  # {set: {"x2": {"psnr": .., "ssim": ..}}}, the metrics files


@dataclass(frozen=True)
class Column:
    """One method of the table: our scores and the paper column they are compared with."""

    label: str  # "bicubic" or a train section name ("vdsr", "srcnn", ...)
    paper: str | None  # a key of METHODS, or None when the paper has no such column
    table: Table


def _cell(psnr: float | None, ssim: float | None) -> str:
    return "–" if psnr is None or ssim is None else f"{psnr:.2f} / {ssim:.4f}"


def _paper(method: str | None, dataset: str, scale: str) -> tuple[float, float] | None:
    return TABLE3.get(dataset, {}).get(scale, {}).get(method) if method else None


def results_table(columns: list[Column]) -> str:
    """Markdown in the layout of the paper's Table 3: one row per set and scale, and for each method
    the paper's PSNR/SSIM, ours and our PSNR minus the paper's (dB). Rows follow the first column;
    a value missing from a column or the paper shows as "–"."""
    header, rule = ["Dataset", "Scale"], ["---", "---"]
    for column in columns:
        name = column.label if column.paper in (None, column.label) else f"{column.label} ({column.paper})"
        header += [f"{name}: paper", f"{name}: ours", "Δ dB"]
        rule += ["---"] * 3
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    for dataset, by_scale in columns[0].table.items():
        for scale in by_scale:
            cells = [dataset, scale]
            for column in columns:
                paper = _paper(column.paper, dataset, scale)
                ours = column.table.get(dataset, {}).get(scale)
                cells.append(_cell(*paper) if paper else "–")
                cells.append(_cell(ours["psnr"], ours["ssim"]) if ours else "–")
                cells.append(f"{ours['psnr'] - paper[0]:+.2f}" if ours and paper else "–")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def eval_metrics(columns: list[Column]) -> dict:
    """All of the table for ``metrics/eval.json``: ``{set: {scale: {label: {psnr, ssim, paper_psnr,
    paper_ssim, psnr_vs_paper}}}}`` (the paper's keys only where it has the value)."""
    metrics: dict = {}
    for column in columns:
        for dataset, by_scale in column.table.items():
            for scale, ours in by_scale.items():
                entry = {"psnr": round(ours["psnr"], 4), "ssim": round(ours["ssim"], 4)}
                if paper := _paper(column.paper, dataset, scale):
                    entry |= {"paper_psnr": paper[0], "paper_ssim": paper[1],
                              "psnr_vs_paper": round(ours["psnr"] - paper[0], 4)}
                metrics.setdefault(dataset, {}).setdefault(scale, {})[column.label] = entry
    return metrics


# --- per image ----------------------------------------------------------------------------------

PerImage = dict[str, dict[str, dict]]  # {set: {"x2": {"images": {name: {"psnr", "ssim"}}}}} (evaluate_images)


def per_image_rows(results: dict[str, PerImage]) -> list[dict[str, object]]:
    """One row per (set, image, scale): ``<label>_psnr`` and ``<label>_ssim`` of each method.

    ``results``: {label: per-image results of :func:`vdsr.evaluate.evaluate_images` per set}; rows
    follow the first method's sets, scales and images.
    """
    first = next(iter(results.values()))
    rows = []
    for dataset, by_scale in first.items():
        for scale, entry in by_scale.items():
            for image in entry["images"]:
                row: dict[str, object] = {"set": dataset, "image": image, "scale": int(scale[1:])}
                for label, result in results.items():
                    scores = result.get(dataset, {}).get(scale, {}).get("images", {}).get(image, {})
                    row[f"{label}_psnr"] = round(scores["psnr"], 4) if scores else ""
                    row[f"{label}_ssim"] = round(scores["ssim"], 4) if scores else ""
                rows.append(row)
    return rows


def gains(rows: list[dict[str, object]], model: str, over: str = "bicubic") -> list[tuple[float, dict]]:
    """(``model`` PSNR minus ``over`` PSNR, row) of every row that has both, largest gain first."""
    found = [(float(row[f"{model}_psnr"]) - float(row[f"{over}_psnr"]), row)
             for row in rows if row.get(f"{model}_psnr", "") != "" and row.get(f"{over}_psnr", "") != ""]
    return sorted(found, key=lambda item: (-item[0], item[1]["set"], item[1]["image"], item[1]["scale"]))


def gains_table(ranked: list[tuple[float, dict]], count: int) -> str:
    """Markdown: the ``count`` largest and smallest gains of :func:`gains`."""
    lines = ["| | set | image | scale | gain (dB) |", "|---|---|---|---|---|"]
    picks = [("most", item) for item in ranked[:count]]
    picks += [("least", item) for item in ranked[max(count, len(ranked) - count):]]
    for which, (gain, row) in picks:
        lines.append(f"| {which} | {row['set']} | {row['image']} | x{row['scale']} | {gain:+.2f} |")
    return "\n".join(lines) + "\n"


# --- comparison panels ---------------------------------------------------------------------------


def crop_panel(panels: list[tuple[str, np.ndarray]], zoom: int) -> Image.Image:
    """Crops side by side, each enlarged ``zoom`` times (nearest neighbour) under its label.

    ``panels``: (label, uint8 (h, w, 3) RGB or (h, w) gray), all the same size.
    """
    height, width = panels[0][1].shape[:2]
    gap, label_h = 8, 16
    figure = Image.new("RGB", (len(panels) * (width * zoom + gap) - gap, label_h + height * zoom), "white")
    draw = ImageDraw.Draw(figure)
    font = ImageFont.load_default()
    for i, (label, pixels) in enumerate(panels):
        if pixels.shape[:2] != (height, width):
            raise ValueError(f"panel {label!r} is {pixels.shape[:2]}, expected {(height, width)}")
        x = i * (width * zoom + gap)
        draw.text((x + 2, 2), label, fill="black", font=font)
        crop = Image.fromarray(pixels).convert("RGB").resize((width * zoom, height * zoom), Image.Resampling.NEAREST)
        figure.paste(crop, (x, label_h))
    return figure

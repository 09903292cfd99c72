"""DVC stage ``report``: the paper's Table 3 from our bicubic and every trained model, and the figure.

Run from the repository root: ``python stages/report.py``. Reads the names of the models (the
sections of ``train`` in params.yaml, each with its ``model`` architecture, which picks the
paper's column it is compared with), ``evaluate.sets``/``scales``, ``results/bicubic.json`` (the
baseline stage) and ``results/<name>.json`` (the evaluate stages). Writes:

- ``metrics/eval.json``: ``{set: {scale: {method: {psnr, ssim, paper_psnr, paper_ssim, psnr_vs_paper}}}}``;
- ``reports/results.md``: Table 3 with ours beside the paper's, the images where each VDSR gains
  most and least over bicubic, and the evaluation time per set;
- ``reports/per_image.csv``: every image's PSNR/SSIM per method and scale;
- ``plots/comparison/<set>_<image>_x<scale>.png``: HR, bicubic and each model on a crop, with
  each method's PSNR on the whole image (models run on the crop plus their receptive field only,
  which gives the whole-image values; :func:`vdsr.inference.predict_window`);

and adds the report, table, per-image file and panels to every model's MLflow run (the one that
holds its evaluation) when that run is this DVC experiment's and has no report yet, else to a new
run (:func:`vdsr.tracking.continue_run`): an experiment that skipped a model's stages leaves the
run of the experiment that evaluated it as it was.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np

from paths import RAW_DIR, RESULTS_DIR, ModelPaths
from vdsr import paper, tracking
from vdsr.color import modcrop, rgb2ycbcr, ycbcr2rgb
from vdsr.config import ParamsError, load_params, require
from vdsr.evaluate import to_uint8
from vdsr.images import ImageError, read_image
from vdsr.io import atomic_path, error_message, write_json_atomic, write_text_atomic
from vdsr.models import ModelFileError, load_model, resolve_device
from vdsr.resize import imresize
from vdsr.inference import predict_window

BICUBIC = RESULTS_DIR / "bicubic.json"
METRICS = Path("metrics/eval.json")  # the paths below are the stage's outs in dvc.yaml
REPORT = Path("reports/results.md")
PER_IMAGE = Path("reports/per_image.csv")
FIGURES_DIR = Path("plots/comparison")
# (set, image stem, scale, HR crop (top, left, side)): as the paper's figures, fine texture and
# straight edges; drawn for the sets that are evaluated.
FIGURES = [
    ("Set5", "butterfly", 4, (80, 80, 96)),
    ("Set14", "zebra", 3, (150, 200, 96)),
    ("Urban100", "img_012", 4, (300, 120, 120)),
    ("Urban100", "img_092", 4, (360, 480, 120)),
]
ZOOM = 3  # crops are enlarged by this factor (nearest neighbour)
GAINS_SHOWN = 5  # images listed with the largest and with the smallest gain over bicubic

log = logging.getLogger("vdsr.stages.report")


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    require(isinstance(data, dict) and isinstance(data.get("sets"), dict), str(path),
            "a JSON object with 'sets' (written by the baseline or an evaluate stage)", type(data).__name__)
    return data


def model_sections() -> dict[str, str]:
    """{section name: architecture} of params.yaml's ``train`` sections, in the paper's column order."""
    sections = load_params().get("train")
    require(isinstance(sections, dict) and len(sections) > 0, "params.yaml: train",
            "a mapping of model names to sections", sections)
    for name, section in sections.items():
        require(isinstance(section, dict) and section.get("model") in paper.METHODS[1:],
                f"params.yaml: train.{name}.model", "vdsr or srcnn", (section or {}).get("model"))
    ordered = sorted(sections.items(), key=lambda item: paper.METHODS.index(item[1]["model"]))  # stable
    return {name: section["model"] for name, section in ordered}


def panel(set_name: str, stem: str, scale: int, box: tuple[int, int, int], models: dict, psnrs: dict) -> object:
    """HR | bicubic | each model on one crop of one image, as an RGB image with PSNR labels."""
    image = read_image(RAW_DIR / set_name / f"{stem}.png")
    hr = modcrop(image, scale)
    top, left, side = box
    crop = (top, left, min(top + side, hr.shape[0]), min(left + side, hr.shape[1]))
    rows, cols = slice(crop[0], crop[2]), slice(crop[1], crop[3])
    low = imresize(hr.astype(np.float64) / 255.0, 1.0 / scale)
    bicubic = imresize(rgb2ycbcr(low) if low.ndim == 3 else low, float(scale))  # YCbCr (or gray) of the HR size

    def to_rgb(y_crop: np.ndarray) -> np.ndarray:
        if bicubic.ndim == 2:
            return to_uint8(y_crop)
        ycbcr = bicubic[rows, cols].copy()
        ycbcr[..., 0] = y_crop
        return to_uint8(ycbcr2rgb(ycbcr))

    y = bicubic if bicubic.ndim == 2 else bicubic[..., 0]
    panels = [("HR", hr[rows, cols]), (f"bicubic {psnrs['bicubic']:.2f} dB", to_rgb(y[rows, cols]))]
    for name, (model, device) in models.items():
        panels.append((f"{name} {psnrs[name]:.2f} dB", to_rgb(predict_window(model, y, crop, device))))
    return paper.crop_panel(panels, ZOOM)


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report_stage()
    except (ParamsError, ImageError, ModelFileError, ValueError, KeyError, OSError) as error:
        print(f"report: error: {error_message(error)}", file=sys.stderr)
        return 1
    return 0


def report_stage() -> None:
    architectures = model_sections()
    bicubic = read_json(BICUBIC)
    results = {name: read_json(ModelPaths(name).results) for name in architectures}
    first = next(iter(results.values()))["sets"]
    columns = [paper.Column("bicubic", "bicubic", _means(bicubic["sets"], first))]
    columns += [paper.Column(name, arch, _means(results[name]["sets"], first)) for name, arch in architectures.items()]
    columns += [paper.Column(f"{name}+ (x8 self-ensemble)", arch, _means(results[name]["self_ensemble_sets"], first))
                for name, arch in architectures.items() if results[name].get("self_ensemble_sets")]
    rows = paper.per_image_rows({"bicubic": _subset(bicubic["sets"], first)} | {n: r["sets"] for n, r in results.items()})

    text = ["# Results: the VDSR paper's Table 3, reproduced\n",
            "PSNR (dB) / SSIM on the Y channel (MATLAB BT.601), border of `scale` pixels shaved, MATLAB bicubic "
            "degradation. Paper: Kim et al., CVPR 2016, Table 3 (models trained on 291 images). "
            "Δ: our PSNR minus the paper's. Models: "
            + ", ".join(f"`{n}` ({_describe(results[n]['model'])})" for n in architectures) + ".\n",
            paper.results_table(columns)]
    for name, arch in architectures.items():
        if arch == "vdsr":
            text += [f"\n## Where `{name}` gains most and least over bicubic (PSNR, dB)\n",
                     paper.gains_table(paper.gains(rows, name), GAINS_SHOWN)]
    text += ["\n## Evaluation time per set (evaluate stage, seconds)\n",
             "| model | device | " + " | ".join(first) + " |", "|---|---|" + "---|" * len(first)]
    for name in architectures:
        seconds = results[name].get("seconds", {})
        text.append(f"| {name} | {results[name].get('device', '?')} ({results[name].get('threads', '?')} threads) | "
                    + " | ".join(f"{seconds.get(s, '–')}" for s in first) + " |")

    write_json_atomic(METRICS, paper.eval_metrics(columns))
    write_text_atomic(REPORT, "\n".join(text) + "\n")
    write_csv(PER_IMAGE, rows)
    figures = draw_figures(architectures, rows, first)
    log.info("report: wrote %s, %s, %s and %d panels in %s", METRICS, REPORT, PER_IMAGE, len(figures), FIGURES_DIR)
    print(paper.results_table(columns))

    for name in architectures:  # each model's evaluation run, when it is this experiment's, else a new run
        info = results[name].get("mlflow_run") or {}
        with tracking.continue_run(repo_root=Path.cwd(), run_info=info, stage="report", model=name,
                                   device=resolve_device("auto")) as run:
            for path in (REPORT, METRICS, PER_IMAGE):
                run.log_artifact(path, "report")
            run.log_artifact(FIGURES_DIR, "report/comparison")


def draw_figures(architectures: dict[str, str], rows: list[dict], sets: dict) -> list[Path]:
    """The comparison panels of :data:`FIGURES` whose set and scale are evaluated; stale ones removed."""
    device = resolve_device("auto")
    models = {name: (load_model(ModelPaths(name).model, map_location=device)[0], device) for name in architectures}
    scores = {(row["set"], row["image"], row["scale"]): row for row in rows}
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for set_name, stem, scale, box in FIGURES:
        row = scores.get((set_name, stem, scale))
        labels = ["bicubic", *architectures]
        if set_name not in sets or row is None or any(row[f"{label}_psnr"] == "" for label in labels):
            continue  # the image or scale is not evaluated by every method
        psnrs = {label: float(row[f"{label}_psnr"]) for label in labels}
        path = FIGURES_DIR / f"{set_name}_{stem}_x{scale}.png"
        with atomic_path(path) as tmp:
            panel(set_name, stem, scale, box, models, psnrs).save(tmp, format="PNG")
        written.append(path)
    for stale in FIGURES_DIR.glob("*.png"):
        if stale not in written:
            stale.unlink()
    return written


def _means(sets: dict, like: dict) -> paper.Table:
    """{set: {scale: {psnr, ssim}}} of the sets and scales in ``like`` (the models' evaluation)."""
    return {s: {k: {"psnr": sets[s][k]["psnr"], "ssim": sets[s][k]["ssim"]} for k in like[s] if k in sets.get(s, {})}
            for s in like if s in sets}


def _subset(sets: dict, like: dict) -> dict:
    return {s: {k: sets[s][k] for k in like[s] if k in sets[s]} for s in like if s in sets}


def _describe(model: dict) -> str:
    epochs = f", {model['epochs']} epochs" if model.get("epochs") is not None else ""
    return f"{model['architecture']} depth {model['depth']} width {model['width']}{epochs}"


if __name__ == "__main__":
    sys.exit(main())

"""DVC stage ``evaluate``: the trained model on the test sets, beside bicubic and the paper.

Run from the repository root: ``python stages/evaluate.py``. Reads the ``evaluate`` section of
``params.yaml``, ``models/model.pt``, ``models/mlflow_run.json`` (``{"run_id": .., "tracking_uri":
..}`` from the train stage), ``metrics/bicubic.json`` and ``data/raw/<set>``. Scores come from
:func:`vdsr.evaluate.evaluate_folder` with :func:`vdsr.upscale.model_upscaler`, the code behind
``vdsr evaluate --model``, so both give the same numbers. Writes ``metrics/eval.json`` (shaped
like ``metrics/bicubic.json``), ``reports/results.md`` and comparison figures in
``plots/images/``, then completes the train stage's MLflow run with them (``eval/Set5/x2/psnr``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vdsr import evaluate, paper, tracking
from vdsr.color import modcrop
from vdsr.config import ParamsError, load_section, require
from vdsr.images import ImageError, list_images, read_image
from vdsr.io import atomic_path, error_message, write_json_atomic, write_text_atomic
from vdsr.models import ModelFileError, load_model, resolve_device
from vdsr.resize import imresize
from vdsr.upscale import model_upscaler, upscale_pixels

MODEL = Path("models/model.pt")
RUN_FILE = Path("models/mlflow_run.json")
BICUBIC = Path("metrics/bicubic.json")
RAW_DIR = Path("data/raw")
METRICS = Path("metrics/eval.json")  # the paths below are the stage's outs in dvc.yaml
REPORT = Path("reports/results.md")
IMAGES_DIR = Path("plots/images")
DEVICE = "auto"  # cuda when present; evaluation runs in float32 either way
COMPARISONS = [("Set5", "butterfly", 4), ("Set14", "ppt3", 3)]  # (set, image stem, scale), when the set is evaluated

log = logging.getLogger("vdsr.stages.evaluate")


@dataclass(frozen=True)
class EvaluateParams:
    sets: list[str]  # folders of data/raw with HR test images
    scales: list[int]  # subset of 2, 3, 4

    def __post_init__(self) -> None:
        require(len(self.sets) > 0, "evaluate.sets", "at least one set", self.sets)
        require(len(set(self.sets)) == len(self.sets), "evaluate.sets", "no repeated set", self.sets)
        for i, name in enumerate(self.sets):
            require((RAW_DIR / name).is_dir(), f"evaluate.sets[{i}]", f"a folder of {RAW_DIR}", name)
        require(len(self.scales) > 0, "evaluate.scales", "at least one scale", self.scales)
        require(len(set(self.scales)) == len(self.scales), "evaluate.scales", "no repeated scale", self.scales)
        for i, scale in enumerate(self.scales):
            require(scale in (2, 3, 4), f"evaluate.scales[{i}]", "2, 3 or 4", scale)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    require(isinstance(data, dict), str(path), "a JSON object", data)
    return data


def comparison(
    image: np.ndarray, scale: int, upscaler: evaluate.Upscaler, psnrs: tuple[float, float], label: str
) -> Image.Image:
    """HR | bicubic | model figure for one image: RGB degraded by ``imresize(.., 1/s)`` and upscaled."""
    hr = modcrop(image, scale)
    low = imresize(hr.astype(np.float64) / 255.0, 1.0 / scale)
    bicubic = np.clip(imresize(low, float(scale)), 0.0, 1.0)
    model = upscale_pixels(low, scale, upscaler)
    panels = [
        ("HR", hr),
        (f"bicubic x{scale}: {psnrs[0]:.2f} dB", evaluate.to_uint8(bicubic)),
        (f"{label} x{scale}: {psnrs[1]:.2f} dB", evaluate.to_uint8(model)),
    ]
    return paper.comparison_figure(panels, paper.centre_crop_box(*hr.shape[:2]))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        evaluate_stage()
    except (ParamsError, ImageError, ModelFileError, ValueError, OSError) as error:  # OSError: disk full, read-only folder...
        print(f"evaluate: error: {error_message(error)}", file=sys.stderr)
        return 1
    return 0


def evaluate_stage() -> None:
    """Evaluate models/model.pt, write the metrics, report and figures, complete the MLflow run."""
    params = load_section(EvaluateParams, "evaluate")
    log.info("evaluate: params %s", dataclasses.asdict(params))
    sets, scales = params.sets, params.scales

    run_info = read_json(RUN_FILE)
    bicubic = read_json(BICUBIC)
    device = resolve_device(DEVICE)
    model, config, meta = load_model(MODEL, map_location=device)
    label = f"{config.name.upper()} d{config.depth}"
    upscaler = model_upscaler(model, device)

    table, per_image = {}, {}
    for dataset in sets:
        results = evaluate.evaluate_folder(RAW_DIR / dataset, scales, upscaler)
        table[dataset], per_image[dataset] = evaluate.summary(results), results
    figures = {}
    for dataset, stem, scale in COMPARISONS:
        if dataset not in sets:
            continue
        path = next((p for p in list_images(RAW_DIR / dataset) if p.stem == stem), None)
        if path is None:
            raise ImageError(f"{RAW_DIR / dataset}: comparison image {stem!r} not found")
        image = read_image(path)
        bicubic_psnr, model_psnr = (
            evaluate.evaluate_images([(stem, image)], [scale], up)[f"x{scale}"]["psnr"]
            for up in (evaluate.bicubic_upscaler, upscaler)
        )
        figure = comparison(image, scale, upscaler, (bicubic_psnr, model_psnr), label)
        figures[f"{dataset}_{stem}_x{scale}.png"] = figure

    print(evaluate.format_table(table))
    write_json_atomic(METRICS, table)
    trained = f", trained {meta['epochs']} epoch(s)" if meta.get("epochs") is not None else ""
    header = (
        "# Results\n\nPSNR (dB) / SSIM on the Y channel (MATLAB BT.601), border of `scale` pixels shaved, "
        f"MATLAB bicubic degradation. Model `{MODEL}`: {config.name} depth {config.depth} width "
        f"{config.width}{trained}. Paper: Kim et al., CVPR 2016, Table 3 (trained on 291 images).\n\n"
    )
    write_text_atomic(REPORT, header + paper.results_table(table, bicubic, label))
    IMAGES_DIR.mkdir(parents=True, exist_ok=True)
    for stale in IMAGES_DIR.glob("*.png"):
        if stale.name not in figures:
            stale.unlink()
    for name, figure in figures.items():
        with atomic_path(IMAGES_DIR / name) as tmp:
            figure.save(tmp, format="PNG")
    log.info("evaluate: wrote %s, %s, %d figures in %s", METRICS, REPORT, len(figures), IMAGES_DIR)

    run = tracking.resume_run(
        repo_root=Path.cwd(), run_id=run_info.get("run_id"), tracking_uri=run_info.get("tracking_uri"),
        started_run_id=run_info.get("started_run_id"),
    )
    run.log_metrics(
        {
            f"eval/{dataset}/{scale}/{name}": value  # e.g. eval/Set5/x2/psnr
            for dataset, by_scale in table.items()
            for scale, m in by_scale.items()
            for name, value in m.items()
        }
    )
    run.log_artifact(REPORT, "eval")
    run.log_artifact(METRICS, "eval")
    run.log_artifact(IMAGES_DIR, "eval/images")
    run.end()


if __name__ == "__main__":
    sys.exit(main())

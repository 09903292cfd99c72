"""DVC stage ``evaluate@<name>``: the model of section ``train.<name>`` on every test set and scale.

Run from the repository root: ``python stages/evaluate.py <name>``. Reads the ``evaluate``
section of ``params.yaml``, ``models/<name>.pt``, ``models/<name>.mlflow_run.json`` and
``data/raw/<set>``. Scores come from :func:`vdsr.evaluate.evaluate_folder` with
:func:`vdsr.inference.model_upscaler` (tiled fp32 inference, on CUDA when present, on all CPU
cores otherwise), the code behind ``vdsr evaluate --model``, so both give the same numbers.
Writes ``results/<name>.json`` (the model, its MLflow runs, seconds per set, and PSNR/SSIM per set,
scale and image; the ``report`` stage turns the results of all models into the table), the DVC
metrics file ``metrics/eval_<name>.json`` (the means only, ``{<name>: {set: {"x2": {psnr, ssim}}}}``:
``dvc exp show`` columns such as ``vdsr.Set5.x2.psnr``, there for every experiment that reaches this
stage, with or without the report) and adds the means to the training's MLflow run (``eval/Set5/x2/psnr``) when that run is this DVC
experiment's, else to a new run (:func:`vdsr.tracking.continue_run`; a log line says which).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from paths import RAW_DIR, ModelPaths

from vdsr import evaluate, tracking
from vdsr.config import ParamsError, load_section, require
from vdsr.images import ImageError
from vdsr.inference import DEFAULT_TILE, model_upscaler, self_ensemble
from vdsr.io import error_message, write_json_atomic
from vdsr.models import ModelFileError, load_model, resolve_device
from vdsr.runtime import keep_freed_memory

DEVICE = "auto"  # cuda when present; evaluation runs in float32 either way
TILE = DEFAULT_TILE  # network input tiles of 512 px (+ receptive-field margin): bounded memory, same output

log = logging.getLogger("vdsr.stages.evaluate")


@dataclass(frozen=True)
class EvaluateParams:
    sets: list[str]  # folders of data/raw with HR test images
    scales: list[int]  # subset of 2, 3, 4
    self_ensemble: bool = False  # also the x8 self-ensemble (VDSR+, 8x the time), reported as its own row

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


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(argv) != 1 or not re.fullmatch(r"[A-Za-z0-9_-]+", argv[0]):
        print(f"evaluate: error: usage: python stages/evaluate.py <name of a train section>, got {argv}",
              file=sys.stderr)
        return 2
    keep_freed_memory()  # a third less time per whole-image pass (vdsr.runtime)
    try:
        evaluate_stage(ModelPaths(argv[0]))
    except (ParamsError, ImageError, ModelFileError, ValueError, OSError) as error:  # OSError: disk full, read-only folder...
        print(f"evaluate: error: {error_message(error)}", file=sys.stderr)
        return 1
    return 0


def evaluate_stage(out: ModelPaths) -> None:
    """Score models/<name>.pt on every set and scale, write results/<name>.json and
    metrics/eval_<name>.json, complete the MLflow run."""
    params = load_section(EvaluateParams, "evaluate")
    log.info("evaluate %s: params %s", out.name, dataclasses.asdict(params))
    sets, scales = params.sets, params.scales

    run_info = read_json(out.mlflow_run)
    device = resolve_device(DEVICE)
    model, config, meta = load_model(out.model, map_location=device)
    upscaler = model_upscaler(model, device, tile=TILE)
    threads = torch.get_num_threads()
    log.info("evaluate %s: %s depth %d width %d on %s (%d CPU threads), fp32, tiles of %d px",
             out.name, config.name, config.depth, config.width, device, threads, TILE)

    results, seconds = {}, {}
    for dataset in sets:
        started = time.perf_counter()
        results[dataset] = evaluate.evaluate_folder(RAW_DIR / dataset, scales, upscaler, progress=f"{out.name} {dataset}")
        seconds[dataset] = round(time.perf_counter() - started, 1)
        log.info("evaluate %s: %s in %.1f s", out.name, dataset, seconds[dataset])
    table = {dataset: evaluate.summary(by_scale) for dataset, by_scale in results.items()}
    print(evaluate.format_table(table))
    plus, plus_table, plus_seconds = {}, {}, {}
    if params.self_ensemble:  # the same weights over the 8 flips/rotations: its own numbers, never the plain ones
        ensembled = self_ensemble(upscaler)
        for dataset in sets:
            started = time.perf_counter()
            plus[dataset] = evaluate.evaluate_folder(RAW_DIR / dataset, scales, ensembled,
                                                     progress=f"{out.name}+ (x8 self-ensemble) {dataset}")
            plus_seconds[dataset] = round(time.perf_counter() - started, 1)
        plus_table = {dataset: evaluate.summary(by_scale) for dataset, by_scale in plus.items()}
        print(f"{out.name}+ (x8 self-ensemble):")
        print(evaluate.format_table(plus_table))

    # The training's run when it is this experiment's, else a new one (tracking.continue_run).
    with tracking.continue_run(repo_root=Path.cwd(), run_info=run_info, stage="evaluate", model=out.name,
                               params={"evaluate": dataclasses.asdict(params)},
                               model_run_id=meta.get("mlflow_run_id"), device=device) as run:
        write_json_atomic(out.results, {
            "model": {"name": out.name, "architecture": config.name, "depth": config.depth, "width": config.width,
                      "epochs": meta.get("epochs")},
            # the run that holds this evaluation (the report stage adds to it), and the training's
            "mlflow_run": run.record() | {"training_run_id": run_info.get("run_id") or run_info.get("started_run_id")},
            "device": str(device),
            "threads": threads,
            "seconds": seconds,
            "sets": results,
            **({"self_ensemble_sets": plus, "seconds_self_ensemble": plus_seconds} if plus else {}),
        })
        # Keyed model first: DVC names an `exp show` column by its key path, and a path found in two
        # files is shown with its file name in front (too wide); `vdsr.Set5.x2.psnr` stays apart from the
        # other models' and from the report's `Set5.x2.vdsr.psnr`.
        write_json_atomic(out.eval_metrics, {out.name: table})
        log.info("evaluate %s: wrote %s and %s", out.name, out.results, out.eval_metrics)
        metrics = {
            f"eval/{dataset}/{scale}/{name}": value  # e.g. eval/Set5/x2/psnr
            for dataset, by_scale in table.items()
            for scale, m in by_scale.items()
            for name, value in m.items()
        }
        metrics |= {f"eval_self_ensemble/{dataset}/{scale}/{name}": value
                    for dataset, by_scale in plus_table.items() for scale, m in by_scale.items()
                    for name, value in m.items()}
        run.log_metrics(metrics | {f"eval/{dataset}/seconds": s for dataset, s in seconds.items()})
        run.log_artifact(out.results, "eval")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

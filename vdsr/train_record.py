"""A training's MLflow run and the record it leaves, as the train stage makes them (rank 0).

:func:`train_and_record` runs the training inside its MLflow run (:func:`vdsr.tracking.training_run`,
tagged with the provenance, the runtime and the data's hashes; ended KILLED when stopped by a
signal, FAILED on an error), then writes the record (:func:`write_record`): the model file with
its meta (:func:`vdsr.checkpoints.stage_meta`: seed, data hashes, git commit, the params section
as given, the history, the runs of the training), the summary metrics
(:func:`vdsr.train.summary_metrics`, JSON), the history as a CSV for ``dvc plots`` (one row per
epoch: ``epoch``, ``train_loss``, ``lr``, one ``val_psnr_x<s>`` per validated scale) and the
MLflow run's record (``{"run_id", "started_run_id", "tracking_uri"}``). Logged to the run: the
epochs of earlier, interrupted runs of the training, the metrics and CSV files and the model.
Every file is written atomically (:mod:`vdsr.io`); where they go is the caller's
(``stages/paths.py``'s ``ModelPaths``).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from vdsr import provenance, tracking
from vdsr.checkpoints import stage_meta, write_model_file
from vdsr.io import write_json_atomic, write_text_atomic
from vdsr.train import TrainingInterrupted, summary_metrics

if TYPE_CHECKING:
    from vdsr.models import ModelConfig
    from vdsr.recipe import TrainParams
    from vdsr.runtime import Runtime
    from vdsr.tracking import Run, TrainingChain
    from vdsr.train import TrainResult

log = logging.getLogger(__name__)


class RecordFiles(Protocol):
    """Where the record goes (``stages/paths.py``'s ``ModelPaths`` is one)."""

    @property
    def model(self) -> Path: ...  # models/<name>.pt
    @property
    def train_metrics(self) -> Path: ...  # metrics/train_<name>.json
    @property
    def train_plot(self) -> Path: ...  # plots/train_<name>.csv
    @property
    def mlflow_run(self) -> Path: ...  # models/<name>.mlflow_run.json
    @property
    def checkpoint(self) -> Path: ...  # checkpoints/<name>/last.pt, which train() writes


def write_plot_csv(path: Path, history: list[dict[str, float]]) -> None:
    """plots/train.csv: epoch, train_loss, lr and one val_psnr_x<s> column per validated scale."""
    columns = ["epoch", "train_loss", "lr", *sorted(k for k in history[0] if k.startswith("val_psnr_x"))]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(path, buffer.getvalue())


def write_record(out: RecordFiles, result: TrainResult, model_config: ModelConfig, run: Run,
                 chain: TrainingChain, *, seed: int, train_sha256: str, val_sha256: str, tags: dict[str, str],
                 params: dict[str, Any], input_example: np.ndarray) -> dict[str, Any]:
    """Write the record of ``result`` to ``out`` and log it to ``run``; returns the summary metrics.

    ``tags``: the run's tags (the model file keeps ``git.commit`` and ``git.dirty``), ``params``:
    this model's params.yaml section as given, ``input_example``: a few input patches (logged as
    float32, N x 1 x H x W) for the logged model's signature.
    """
    chain.log_earlier_epochs(result.history[: result.resumed_from])  # epochs of an earlier, interrupted run
    metrics = summary_metrics(result.history)
    meta = stage_meta(mlflow_run_id=run.run_id or run.started_run_id, seed=seed, history=result.history,
                      train_sha256=train_sha256, val_sha256=val_sha256, tags=tags, params=params,
                      metrics=metrics, mlflow_runs=chain.runs, warm_start=result.checkpoint_extra.get("warm_start"))
    write_model_file(out.model, result.model, model_config, meta)
    write_json_atomic(out.train_metrics, metrics)
    write_plot_csv(out.train_plot, result.history)
    write_json_atomic(out.mlflow_run, run.record())  # started_run_id: the run on the store even if tracking failed
    run.log_artifact(out.train_metrics, artifact_path="metrics")
    run.log_artifact(out.train_plot, artifact_path="plots")
    run.log_model(result.model, input_example=np.asarray(input_example, dtype=np.float32))
    return metrics


def train_and_record(fit: Callable[..., TrainResult], out: RecordFiles, *, name: str, recipe: TrainParams,
                     model_config: ModelConfig, runtime: Runtime, processes: int, data_sha256: tuple[str, str],
                     params: dict[str, Any], input_example: np.ndarray) -> None:
    """Run ``fit`` (:func:`vdsr.train.train` bound to its data, taking the tracking callbacks) in
    the MLflow run of training ``name`` and write its record to ``out`` (:func:`write_record`).

    ``recipe``: section ``train.<name>``, ``params``: all of params.yaml as given (logged),
    ``data_sha256``: of train.h5 and val.h5, ``processes``: torchrun's world size. A
    :class:`vdsr.train.TrainingInterrupted` ends the run KILLED, tagged ``stopped_after``, and is
    raised again.
    """
    train_sha256, val_sha256 = data_sha256
    tags = {**provenance.reproducibility_tags(Path.cwd(), runtime.device), **runtime.tags(), "stage": "train",
            "data.train_sha256": train_sha256, "data.val_sha256": val_sha256, "processes": str(processes),
            "pipeline.model": name, "pipeline.architecture": recipe.model, "pipeline.run_id": provenance.pipeline_run_id()}
    started = time.perf_counter()
    with tracking.training_run(repo_root=Path.cwd(), params=params, model=name, tags=tags,
                               checkpoint=out.checkpoint) as (run, chain):
        try:
            result = fit(on_start=chain.started, on_epoch_end=chain.log_epoch, checkpoint_extra=chain.extra)
        except TrainingInterrupted as stopped:
            run.set_tags({"stopped_after": str(stopped.position)})
            run.end("KILLED")
            raise
        metrics = write_record(out, result, model_config, run, chain, seed=recipe.seed, train_sha256=train_sha256,
                               val_sha256=val_sha256, tags=tags, params=params["train"][name],
                               input_example=input_example)
    log.info("train: %s", ", ".join(f"{key} {value}" for key, value in metrics.items()))
    log.info("wrote %s, %s, %s, %s and %s in %.0f s (mlflow run %s at %s)", out.model, out.train_metrics,
             out.train_plot, out.mlflow_run, out.checkpoint, time.perf_counter() - started, run.run_id, run.tracking_uri)

"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the weights (and their moving average, when the recipe keeps one), optimizer state, global RNG states, the history of finished
epochs and where in the run it was taken: after ``epoch`` whole epochs and ``step`` further
steps of the next one (with that partial epoch's loss sum), so a run stopped mid-epoch resumes
at the next step. The recipe (:class:`vdsr.train.TrainConfig`) and model config are stored and
compared on resume; runtime choices (device, precision, layout, compilation) are not part of it,
so a checkpoint written in one precision or on one device resumes in another.
All plain types: read with ``torch.load(weights_only=True)``.

A checkpoint is never discarded or overwritten unasked: one that cannot be resumed (other
settings, other data, unreadable) stops training with :class:`CheckpointRefused`, which says why;
with ``start_over`` it is moved aside to a dated name (``last.20261201-2305.pt``, beside it or in
the caller's folder for them), never deleted.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from vdsr.config import require
from vdsr.io import remove_stale_temporaries
from vdsr.models import (
    ModelConfig,
    build_model,
    load_model,
    save_atomic,
    save_model,
    unwrapped_state_dict,
)

if TYPE_CHECKING:
    from torch.optim.swa_utils import AveragedModel

    from vdsr.recipe import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vdsr-checkpoint"
CHECKPOINT_VERSION = 2  # 2: mid-epoch position (step, loss_sum); 1 (epoch ends only) is still read
START_OVER_ENV = "VDSR_START_OVER"  # 1: a checkpoint that cannot be resumed is moved aside, not refused
START_OVER = (f"run the same command again with {START_OVER_ENV}=1 (`{START_OVER_ENV}=1 dvc repro`, "
              f"`{START_OVER_ENV}=1 dvc exp run ...`)")  # how to, in the message of a refused checkpoint


@dataclasses.dataclass(frozen=True)
class Position:
    """Where a run stands: ``epoch`` whole epochs done and ``step`` steps of the next one."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0  # the partial epoch's summed step losses
    elapsed_s: float = 0.0  # seconds spent training and validating up to here, resumed runs summed

    def __str__(self) -> str:
        return f"epoch {self.epoch}" + (f" and {self.step} steps of epoch {self.epoch + 1}" if self.step else "")


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read as one, or cannot be resumed."""


class CheckpointRefused(CheckpointError):
    """The checkpoint at ``path`` cannot be resumed, for ``reasons``; it is left as it is.

    ``way_out`` completes the message: how the caller asks to train from scratch instead (the
    library's keyword; the train stage names its environment variable).
    """

    def __init__(self, path: Path, reasons: list[str], way_out: str | None = None, readable: bool = True,
                 aside_dir: Path | None = None) -> None:
        way_out = way_out or "call train(..., start_over=True)"
        self.path, self.reasons, self.way_out, self.readable = Path(path), list(reasons), way_out, readable
        aside = (aside_dir or self.path.parent) / f"{self.path.stem}.<date>-<time>{self.path.suffix}"
        resume = "To resume it, train with the settings and data it was made with; to" if readable else "To"
        super().__init__(
            f"{self.path}: cannot resume from this checkpoint: {'; '.join(self.reasons)}. It is left as it is and "
            f"nothing was trained. {resume} train from scratch instead, {way_out}: that moves it aside to "
            f"{aside} (kept, not deleted)"
        )


def rng_states() -> dict[str, Any]:
    """Global RNG states of python, numpy, torch and CUDA, as types ``weights_only`` loads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: AveragedModel | None = None,
    model_config: ModelConfig,
    config: TrainConfig,
    data_id: str,
    position: Position,
    history: list[dict[str, float]],
    extra: dict[str, Any] | None = None,
    steps_per_epoch: int | None = None,
) -> None:
    """Everything needed to continue from ``position``, written atomically; ``extra``: the caller's;
    ``steps_per_epoch``: the steps of an epoch as run (``config.steps_per_epoch``, or floor(N / batch)
    for 0), kept so that progress can be counted in steps (:mod:`vdsr.release`)."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(config),
        "data_id": data_id,
        "epoch": position.epoch,
        "step": position.step,
        "loss_sum": position.loss_sum,
        "elapsed_s": position.elapsed_s,
        "history": history,
        "extra": extra or {},
        "model": unwrapped_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "rng": rng_states(),
    }
    if steps_per_epoch is not None:
        payload["steps_per_epoch"] = int(steps_per_epoch)
    if ema is not None:  # the averaged weights (train.<name>.ema_decay > 0) and how many steps they average
        payload["ema"] = {"state": unwrapped_state_dict(ema.module), "n_averaged": int(ema.n_averaged.item())}
    save_atomic(path, payload)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint (``weights_only``, on the CPU); :class:`CheckpointError` if it is not one."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a training checkpoint")
    return _checked(payload, path)


def _checked(payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """A checkpoint's ``payload`` of a version this code reads, with the keys of version 1 filled
    in; :class:`CheckpointError` for another version."""
    if payload.get("version") not in (1, CHECKPOINT_VERSION):
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r}, this code reads "
                              f"{CHECKPOINT_VERSION}")
    payload.setdefault("step", 0)
    payload.setdefault("loss_sum", 0.0)
    payload.setdefault("extra", {})
    return payload


def history_of(payload: dict[str, Any]) -> list[dict[str, float]]:
    """The checkpoint's history rows; rows written before ``elapsed_s`` was kept get the running
    sum of the epoch times (``time_s``) as theirs."""
    history, elapsed = [dict(row) for row in payload["history"]], 0.0
    for row in history:
        elapsed += float(row.get("time_s", 0.0))
        row.setdefault("elapsed_s", elapsed)
    return history


def position_of(payload: dict[str, Any]) -> Position:
    """The checkpoint's position; a checkpoint written before ``elapsed_s`` was kept counts the
    epoch times of its history (a lower bound: the partial epoch is not in it)."""
    elapsed = payload.get("elapsed_s")
    if elapsed is None:
        history = history_of(payload)
        elapsed = history[-1]["elapsed_s"] if history else 0.0
    return Position(int(payload["epoch"]), int(payload["step"]), float(payload["loss_sum"]), float(elapsed))


def checkpoint_mismatch(
    payload: dict[str, Any], model_config: ModelConfig, config: TrainConfig, data_id: str, data_name: str = "data_id"
) -> list[str]:
    """Why a checkpoint cannot be continued under these settings; empty when it can.

    Compatible means: same model config, same training config -- except ``epochs`` when the
    learning-rate schedule does not depend on the total (a step schedule: a run may be extended,
    nothing before epoch e depends on the total) -- same ``data_id``, and no more epochs done
    than asked for. A key that the checkpoint's config lacks (written before the key existed)
    counts as its default value. ``data_name`` says what the data id is, for the reason.
    """
    reasons = []
    free = set() if config.schedule_needs_total else {"epochs"}
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for section, saved, current, fallback in (
        ("model", payload["model_config"], dataclasses.asdict(model_config), {}),
        ("train", payload["train_config"], dataclasses.asdict(config), defaults),
    ):
        for key, value in current.items():
            before = saved.get(key, fallback.get(key))
            if key not in free and before != value:
                reasons.append(f"{section}.{key} was {before!r}, now {value!r}")
    if payload["data_id"] != data_id:
        reasons.append(f"the training data differs ({data_name} was {_short_id(payload['data_id'])}, "
                       f"now {_short_id(data_id)})")
    if payload["epoch"] > config.epochs:
        reasons.append(f"it holds {payload['epoch']} epochs, more than epochs = {config.epochs}")
    return reasons


def _short_id(data_id: str) -> str:
    """A data id (``<sha256>+<sha256>``) with each hash cut to 12 digits; ``?`` for none."""
    return "+".join(part[:12] for part in data_id.split("+")) if data_id else "?"


def move_aside(path: Path, folder: Path | None = None) -> Path:
    """Rename the checkpoint ``path`` to ``<stem>.<YYYYmmdd-HHMM>[-n]<suffix>`` in ``folder`` (default:
    beside it; created if need be), dated by its last write (local time) and never onto an existing
    file; returns the new path."""
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y%m%d-%H%M")
    folder = path.parent if folder is None else folder
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        aside = folder / f"{path.stem}.{stamp}{'' if n == 1 else f'-{n}'}{path.suffix}"
        if not aside.exists():
            path.rename(aside)
            return aside
    raise FileExistsError(f"{path}: 999 checkpoints dated {stamp} in {folder} already; move some away")


def aside_dir_of(checkpoint: Path) -> Path:
    """Where the train stage moves a checkpoint ``checkpoints/<name>/last.pt`` that cannot be
    resumed: ``checkpoints/<name>.aside/``, beside its folder and not in it, so that the folder
    (a pipeline output) holds only the training's own files; a model name has no dot."""
    return checkpoint.parent.with_name(f"{checkpoint.parent.name}.aside")


def start_over_requested(environ: Mapping[str, str]) -> bool:
    """Whether :data:`START_OVER_ENV` asks to move a checkpoint that cannot be resumed aside ("1";
    "0" or unset: stop instead); anything else is refused, so a typo does not decide."""
    value = environ.get(START_OVER_ENV, "").strip()
    require(value in ("", "0", "1"), START_OVER_ENV,
            "1 (move a checkpoint that cannot be resumed aside and train from scratch) or 0", value)
    return value == "1"


def checkpoint_to_resume(
    path: Path, model_config: ModelConfig, config: TrainConfig, data_id: str, *, start_over: bool = False,
    way_out: str | None = None, data_name: str = "data_id", aside_dir: Path | None = None,
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if training can continue from it; None if there is none.

    One that cannot be resumed -- made with other settings or data (:func:`checkpoint_mismatch`),
    or unreadable -- raises :class:`CheckpointRefused` and is left as it is; with ``start_over`` it
    is moved aside instead (:func:`move_aside`, into ``aside_dir``, default beside it; with a
    warning) and None is returned: training starts from scratch. A resumable checkpoint is resumed
    either way (from scratch with the same settings and data would give the same weights).
    ``way_out``: how the caller's user asks for ``start_over``, and ``data_name`` what ``data_id``
    is, for the message.

    Also removes temporary files left beside it by a writer that was killed mid-write.
    """
    for stale in remove_stale_temporaries(path):
        log.info("removed %s, left by an interrupted checkpoint write", stale)
    if not path.exists():
        return None
    try:
        payload = load_checkpoint(path)
    except CheckpointError as error:
        payload, reasons = None, [str(error).removeprefix(f"{path}: ")]
    else:
        reasons = checkpoint_mismatch(payload, model_config, config, data_id, data_name)
    if not reasons:
        return payload
    if not start_over:
        raise CheckpointRefused(path, reasons, way_out, readable=payload is not None, aside_dir=aside_dir)
    aside = move_aside(path, aside_dir)
    log.warning("WARNING: checkpoint %s cannot be resumed (%s); moved it aside to %s, training from scratch",
                path, "; ".join(reasons), aside)
    return None


# --- the training record: read from a checkpoint or a model file ---------------------------------


@dataclasses.dataclass
class Trained:
    """Weights and how they were trained, from a checkpoint or a model file."""

    model: torch.nn.Module
    config: ModelConfig
    train_config: dict[str, Any]  # vdsr.recipe.TrainConfig as a dict (the params.yaml section)
    position: Position
    history: list[dict[str, float]]
    data_id: str  # "<train.h5 sha256>+<val.h5 sha256>"
    extra: dict[str, Any]  # mlflow_runs, warm_start, ...
    recorded_steps: int | None = None  # steps of an epoch as run (checkpoint key steps_per_epoch), if recorded

    @property
    def epochs(self) -> int:
        return int(self.train_config["epochs"])

    @property
    def steps_per_epoch(self) -> int | None:
        """The steps of one epoch: the recipe's ``steps_per_epoch``; for 0 (one pass over the N
        patches, floor(N / batch_size) steps) the count the training recorded (the checkpoint's
        ``steps_per_epoch``, written by :func:`vdsr.train.train`); None where neither is known
        (a checkpoint written before the count was recorded)."""
        return int(self.train_config.get("steps_per_epoch", 0)) or self.recorded_steps or None

    @property
    def total_steps(self) -> int | None:
        steps = self.steps_per_epoch
        return None if steps is None else self.epochs * steps

    @property
    def steps_done(self) -> int | None:
        steps = self.steps_per_epoch
        return None if steps is None else self.position.epoch * steps + self.position.step

    @property
    def finished(self) -> bool:
        """All epochs of the recipe done (known without the steps per epoch)."""
        return self.position.epoch >= self.epochs

    def progress(self) -> str:
        """``8 of 12 steps (67%)``; ``epoch 1 of 80 (1%)`` where the steps per epoch are not known."""
        total, done = self.total_steps, self.steps_done
        if total and done is not None:
            return f"{done:,} of {total:,} steps ({100 * done / total:.0f}%)"
        at = self.position
        partial = f" and {at.step:,} steps of epoch {at.epoch + 1}" if at.step else ""
        return f"epoch {at.epoch} of {self.epochs}{partial} ({100 * at.epoch / self.epochs:.0f}%)"


def read_trained(path: Path, weights: str = "output") -> Trained:
    """A training checkpoint (``checkpoints/<name>/last.pt``) or a model file (``models/<name>.pt``,
    a release); ``ValueError`` naming the file if it is neither or lacks the training record.

    ``weights`` of a checkpoint: "output" (the run's output: the averaged weights when the recipe
    keeps a moving average, ``ema_decay > 0``; else the weights), "raw" (the optimizer's weights).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001  (pickle, zip and weights_only errors alike)
        raise ValueError(f"{path}: not a checkpoint or model file ({type(error).__name__}: {error})") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        payload = _checked(payload, path)  # the version check of load_checkpoint
        config = ModelConfig(**payload["model_config"])
        model = build_model(config)
        averaged = payload.get("ema") if weights == "output" else None
        model.load_state_dict(averaged["state"] if averaged else payload["model"])
        extra = dict(payload["extra"])
        extra["weights"] = "averaged (ema_decay " + str(payload["train_config"].get("ema_decay")) + ")" if averaged else "raw"
        extra.setdefault("mlflow_runs", [extra["mlflow_run_id"]] if extra.get("mlflow_run_id") else [])
        return Trained(model.eval(), config, dict(payload["train_config"]), position_of(payload),
                       history_of(payload), payload["data_id"], extra, payload.get("steps_per_epoch"))
    model, config, meta = load_model(path)
    record = meta.get("training") or _from_stage_meta(meta)
    if record is None:
        raise ValueError(f"{path}: a model file without its training record (meta 'training' or 'history')")
    position = Position(int(record["epoch"]), int(record["step"]), 0.0, float(record["elapsed_s"]))
    return Trained(model, config, dict(record["train_config"]), position, list(record["history"]),
                   record["data_id"], dict(record["extra"]), record.get("steps_per_epoch"))


def _from_stage_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The training record of a model file written by ``stages/train.py`` (a finished training)."""
    if "history" not in meta or not meta["history"]:
        return None
    last = meta["history"][-1]
    return {"epoch": int(last["epoch"]), "step": 0, "elapsed_s": float(last.get("elapsed_s", 0.0)),
            "train_config": meta["params"], "history": meta["history"],
            "data_id": f"{meta['train_data_sha256']}+{meta['val_data_sha256']}",
            "extra": {"mlflow_runs": meta.get("mlflow_runs", []), "warm_start": meta.get("warm_start")}}


def training_record(trained: Trained) -> dict[str, Any]:
    """Plain data for the model file's meta: what :func:`read_trained` and the warm start need."""
    return {"epoch": trained.position.epoch, "step": trained.position.step,
            "elapsed_s": trained.position.elapsed_s, "train_config": trained.train_config,
            "history": trained.history, "data_id": trained.data_id, "extra": trained.extra,
            "steps_per_epoch": trained.recorded_steps}


# --- model files' metadata ----------------------------------------------------------------------


def write_model_file(path: str | Path, model: nn.Module, model_config: ModelConfig, meta: dict[str, Any]) -> None:
    """A model file (:func:`vdsr.models.save_model`: weights, constructor arguments, ``meta``) at
    ``path``, atomically; ``meta`` from :func:`stage_meta` or :func:`release_meta`."""
    save_model(path, model, model_config, meta)


def read_model_file(path: str | Path) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Model (CPU, eval mode), its config and ``meta`` of a model file (:func:`vdsr.models.load_model`;
    ``ModelFileError`` if it is not one)."""
    return load_model(path)


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` of a model file (:func:`read_model_file`)."""
    return read_model_file(path)[2]


def stage_meta(*, mlflow_run_id: str | None, seed: int, history: list[dict[str, float]], train_sha256: str,
               val_sha256: str, tags: dict[str, str], params: dict[str, Any], metrics: dict[str, Any],
               mlflow_runs: list[str | None], warm_start: dict[str, Any] | None) -> dict[str, Any]:
    """The meta of ``models/<name>.pt`` as the train stage writes it (a finished training;
    :func:`read_trained` reads it back): ``params`` the params.yaml section as given, ``tags`` the
    run's provenance tags (``git.commit``, ``git.dirty``), ``history`` one row per epoch (vdsr.release
    draws it), ``mlflow_runs`` the runs of this training, oldest first, ``warm_start`` set by
    ``python -m vdsr.release warm-start``."""
    return {
        "mlflow_run_id": mlflow_run_id,
        "seed": seed,
        "epochs": len(history),
        "train_data_sha256": train_sha256,
        "val_data_sha256": val_sha256,
        "git_commit": tags.get("git.commit"),
        "git_dirty": tags.get("git.dirty"),
        "params": dict(params),
        "metrics": metrics,
        "history": history,
        "mlflow_runs": mlflow_runs,
        "warm_start": warm_start,
    }


def release_meta(trained: Trained, provenance: dict[str, Any]) -> dict[str, Any]:
    """The meta of a released model file: the training record (:func:`training_record`), the card's
    ``provenance`` (:func:`vdsr.model_card.provenance`), and ``params``, ``epochs``, ``mlflow_run_id``
    and ``git_commit`` as :func:`stage_meta` writes them (the last run of the chain)."""
    last_run = next(reversed(provenance["runs"].items()), (None, {}))
    return {"training": training_record(trained), "provenance": provenance, "params": trained.train_config,
            "epochs": trained.position.epoch, "mlflow_run_id": last_run[0], "git_commit": last_run[1].get("git.commit")}

"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint holds the weights (and their moving average, when the recipe keeps one), optimizer state, global RNG states, the history of finished
epochs and where in the run it was taken: after ``epoch`` whole epochs and ``step`` further
steps of the next one (with that partial epoch's loss sum), so a run stopped mid-epoch resumes
at the next step. The recipe (:class:`vdsr.train.TrainConfig`) and model config are stored and
compared on resume; runtime choices (device, precision, layout, compilation) are not part of it,
so a checkpoint written in one precision or on one device resumes in another.
All plain types: read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn

from vdsr.io import remove_stale_temporaries
from vdsr.models import ModelConfig, save_atomic, unwrapped_state_dict

if TYPE_CHECKING:
    from torch.optim.swa_utils import AveragedModel

    from vdsr.train import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "vdsr-checkpoint"
CHECKPOINT_VERSION = 2  # 2: mid-epoch position (step, loss_sum); 1 (epoch ends only) is still read


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
    """A checkpoint file exists but cannot be read as one."""


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
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {error}); "
                              "delete it to train from scratch") from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a training checkpoint; delete it to train from scratch")
    if payload.get("version") not in (1, CHECKPOINT_VERSION):
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r}, this code reads "
                              f"{CHECKPOINT_VERSION}; delete it to train from scratch")
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
    payload: dict[str, Any], model_config: ModelConfig, config: TrainConfig, data_id: str
) -> list[str]:
    """Why a checkpoint cannot be continued under these settings; empty when it can.

    Compatible means: same model config, same training config -- except ``epochs`` when the
    learning-rate schedule does not depend on the total (a step schedule: a run may be extended,
    nothing before epoch e depends on the total) -- same ``data_id``, and no more epochs done
    than asked for. A key that the checkpoint's config lacks (written before the key existed)
    counts as its default value.
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
        reasons.append(f"training data was {payload['data_id'] or '?'}, now {data_id or '?'}")
    if payload["epoch"] > config.epochs:
        reasons.append(f"it holds {payload['epoch']} epochs, more than epochs = {config.epochs}")
    return reasons


def checkpoint_to_resume(
    path: Path, model_config: ModelConfig, config: TrainConfig, data_id: str
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if training can continue from it; None if there is none or it
    was made with other settings (with a warning: it is overwritten at the next checkpoint).

    Also removes temporary files left beside it by a writer that was killed mid-write.
    """
    for stale in remove_stale_temporaries(path):
        log.info("removed %s, left by an interrupted checkpoint write", stale)
    if not path.exists():
        return None
    payload = load_checkpoint(path)
    reasons = checkpoint_mismatch(payload, model_config, config, data_id)
    if reasons:
        log.warning("WARNING: ignoring checkpoint %s, made with other settings (%s); training from "
                    "scratch, it will be overwritten", path, "; ".join(reasons))
        return None
    return payload



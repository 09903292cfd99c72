"""The schema of a model's ``params.yaml`` section, ``train.<name>``: the one place it is checked.

:class:`TrainParams` lists every key of a section with its type (:func:`vdsr.config.from_dict`
checks types and unknown or missing keys) and checks ranges and relations in ``__post_init__``;
errors name the params.yaml key, ``train.<name>.<key>``. ``stages/train.py`` reads its section
through :func:`load_model_section`, and :mod:`vdsr.presets` validates a preset applied to
params.yaml through :func:`check_train_sections`, so a preset that passes is one the stage takes.

The recipe part of a section (what changes the weights) becomes :class:`TrainConfig`, the library's
form of the recipe (stored in checkpoints, compared on resume);
the last keys say how training runs (device, precision, layout, compilation, checkpoint interval).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from vdsr.config import ParamsError, from_dict, load_params, require, require_field
from vdsr.models import ModelConfig
from vdsr.runtime import COMPILE_MODES

OPTIMIZERS = ("sgd", "adam", "adamw")
CLIP_MODES = ("adjustable", "norm", "none")
SCHEDULES = ("step", "cosine")
LOSSES = ("l2", "mse", "l1")


@dataclass(frozen=True)
class TrainConfig:
    """The recipe: everything that changes the trained weights (runtime choices are not here)."""

    optimizer: str = "sgd"  # "sgd" (paper) | "adam" | "adamw" (decoupled weight decay)
    lr: float = 0.1  # initial (peak) learning rate (paper: 0.1)
    momentum: float = 0.9  # SGD momentum (paper: 0.9); Adam keeps its default betas
    weight_decay: float = 1e-4  # SGD/Adam: L2 penalty added to the gradient after clipping (paper: 1e-4)
    lr_schedule: str = "step"  # "step" (paper) | "cosine" (to min_lr over all epochs x steps)
    lr_step_epochs: int = 20  # step: lr multiplied by lr_gamma every this many epochs (paper: 20)
    lr_gamma: float = 0.1  # step: (paper: 0.1)
    min_lr: float = 0.0  # cosine: the learning rate at the last step
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr over the first steps (any schedule)
    epochs: int = 80  # (paper: 80)
    batch_size: int = 64  # (paper: 64)
    loss: str = "l2"  # "l2" (paper: half the squared error summed per patch) | "mse" | "l1" (per-pixel means)
    clip: str = "adjustable"  # "adjustable" (paper) | "norm" | "none"
    clip_theta: float = 1e-4  # adjustable: theta (not given in the paper); norm: the max gradient norm
    augment: bool = True  # random flips and 90-degree rotations, per patch
    steps_per_epoch: int = 0  # 0: one pass, floor(N / batch_size) batches; > 0: that many batches
    seed: int = 0  # model init, shuffling and augmentation
    ema_decay: float = 0.0  # weight averaging: 0 off; else an exponential moving average of the weights
    loss_border: int = 0  # pixels left out of the loss at each side of a patch (SRCNN's valid output: 8)

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            (self.clip in CLIP_MODES, "clip", f"one of {CLIP_MODES}"),
            (self.lr_schedule in SCHEDULES, "lr_schedule", f"one of {SCHEDULES}"),
            (self.loss in LOSSES, "loss", f"one of {LOSSES}"),
            (self.lr > 0, "lr", "> 0"),
            (0 <= self.min_lr <= self.lr, "min_lr", "in [0, lr]"),
            (self.warmup_steps >= 0, "warmup_steps", ">= 0"),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.lr_step_epochs >= 1, "lr_step_epochs", ">= 1"),
            (0 < self.lr_gamma <= 1, "lr_gamma", "in (0, 1]"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.clip_theta > 0, "clip_theta", "> 0"),
            (self.steps_per_epoch >= 0, "steps_per_epoch", ">= 0"),
            (self.seed >= 0, "seed", ">= 0"),
            (0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)"),
            (self.loss_border >= 0, "loss_border", ">= 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")

    @property
    def schedule_needs_total(self) -> bool:
        """Whether the learning rate of a step depends on the run's length (cosine: yes)."""
        return self.lr_schedule != "step"


@dataclass(frozen=True)
class TrainParams:
    """A ``train.<name>`` section of params.yaml; every key is required (see the comments there)."""

    model: Literal["vdsr", "srcnn"]
    depth: int
    width: int
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: float
    momentum: float
    weight_decay: float
    lr_schedule: Literal["step", "cosine"]
    lr_step_epochs: int
    lr_gamma: float
    min_lr: float
    warmup_steps: int
    epochs: int
    batch_size: int
    loss: Literal["l2", "mse", "l1"]
    clip: Literal["adjustable", "norm", "none"]
    clip_theta: float
    augment: bool
    steps_per_epoch: int
    seed: int
    device: str
    precision: Literal["auto", "fp32", "bf16"]
    channels_last: bool
    compile: Literal[COMPILE_MODES]  # type: ignore[valid-type]
    checkpoint_minutes: float
    ema_decay: float = 0.0  # optional: sections written before weight averaging existed mean 0 (off)
    loss_border: int = 0  # optional: 0, the loss on every pixel of the patch

    def __post_init__(self) -> None:
        require_field(self.depth >= 3, "depth", "an integer >= 3", self.depth)
        require_field(self.width >= 2, "width", "an integer >= 2", self.width)
        require_field(self.lr > 0, "lr", "a number > 0", self.lr)
        require_field(0 <= self.momentum < 1, "momentum", "a number in [0, 1)", self.momentum)
        require_field(self.weight_decay >= 0, "weight_decay", "a number >= 0", self.weight_decay)
        require_field(self.lr_step_epochs >= 1, "lr_step_epochs", "an integer >= 1", self.lr_step_epochs)
        require_field(0 < self.lr_gamma <= 1, "lr_gamma", "a number in (0, 1]", self.lr_gamma)
        require_field(0 <= self.min_lr <= self.lr, "min_lr", f"a number in [0, lr] (lr is {self.lr!r})", self.min_lr)
        require_field(self.warmup_steps >= 0, "warmup_steps", "an integer >= 0", self.warmup_steps)
        require_field(self.epochs >= 1, "epochs", "an integer >= 1", self.epochs)
        require_field(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require_field(self.clip_theta > 0, "clip_theta", "a number > 0", self.clip_theta)
        require_field(self.steps_per_epoch >= 0, "steps_per_epoch", "an integer >= 0", self.steps_per_epoch)
        require_field(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require_field(0 <= self.ema_decay < 1, "ema_decay", "a number in [0, 1) (0: off)", self.ema_decay)
        require_field(isinstance(self.loss_border, int) and self.loss_border >= 0, "loss_border",
                      "an integer >= 0 (0: every pixel)", self.loss_border)
        require_field(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
                      "auto, cpu, cuda or cuda:N", self.device)
        require_field(self.checkpoint_minutes >= 0, "checkpoint_minutes", "a number >= 0 (0: at epoch ends only)",
                      self.checkpoint_minutes)

    def check_processes(self, key: str, processes: int) -> None:
        """:class:`ParamsError` naming ``<key>.<field>`` unless this section suits ``processes``
        torchrun processes: each takes an equal share of a batch and its own GPU (cuda:LOCAL_RANK)."""
        if processes == 1:
            return
        require(self.batch_size % processes == 0, f"{key}.batch_size",
                f"a multiple of the number of processes ({processes}): each takes an equal share of a batch",
                self.batch_size)
        require(not self.device.startswith("cuda:"), f"{key}.device",
                "auto, cuda or cpu under torchrun (each process uses cuda:LOCAL_RANK)", self.device)

    def model_config(self) -> ModelConfig:
        """The network of this section. SRCNN is always 9-5-5 (3 layers, ``depth`` unused);
        ``width`` sets its n1 (64: the paper's 64/32 channels)."""
        return ModelConfig(name=self.model, depth=self.depth if self.model == "vdsr" else 3, width=self.width)

    def train_config(self) -> TrainConfig:
        """The recipe part of this section (the keys :class:`TrainConfig` has)."""
        return TrainConfig(**{field.name: getattr(self, field.name) for field in fields(TrainConfig)})


def train_sections(params: dict[str, Any], where: str) -> dict[str, Any]:
    """The ``train`` mapping of a params dict (model name -> section); ``where`` names the file."""
    if "train" not in params:
        raise ParamsError(f"{where}: section 'train' is missing")
    sections = params["train"]
    require(isinstance(sections, dict) and len(sections) > 0, f"{where}: train",
            "a mapping of model names to sections (train: {vdsr: {...}, srcnn: {...}})", sections)
    return sections


def model_section(params: dict[str, Any], name: str, where: str) -> TrainParams:
    """Section ``train.<name>`` of a params dict as :class:`TrainParams`; :class:`ParamsError`
    naming ``<where>: train.<name>.<key>``."""
    sections = train_sections(params, where)
    require(name in sections, f"{where}: train", f"a section {name!r} (sections: {', '.join(sections)})", name)
    try:
        return from_dict(TrainParams, sections[name], f"train.{name}")
    except ParamsError as error:
        raise ParamsError(f"{where}: {error}") from None


def load_model_section(name: str, path: Path = Path("params.yaml")) -> TrainParams:
    """Section ``train.<name>`` of the file ``path``, as the train stage reads it."""
    return model_section(load_params(path), name, str(path))


def check_train_sections(params: dict[str, Any], where: str) -> dict[str, TrainParams]:
    """Every section of ``train`` validated as the train stage validates its own."""
    return {name: model_section(params, name, where) for name in train_sections(params, where)}

"""The training loop: VDSR's recipe (Kim et al. 2016, Sec. 3.3 and 4.1), written like nanoGPT's.

Recipe. Multi-scale patches (all scales shuffled together), random flips and 90-degree rotations
per patch, the paper's loss, SGD with momentum 0.9 and weight decay 1e-4 (or Adam/AdamW), learning
rate 0.1 divided by 10 every 20 epochs, and *adjustable gradient clipping*: each gradient
element is clipped to [-theta/lr, theta/lr], so that the gradient part of a step, lr x g, stays
within theta whatever the learning rate. Only the loss gradient is clipped: the optimizer adds
weight decay afterwards, inside its step. Faster recipes for other budgets (a cosine schedule
with linear warm-up over a fixed number of steps, Adam, L1) are options of :class:`TrainConfig`;
the paper's recipe is its default.

Loss. The paper's ``1/2 ||r - f(x)||^2`` -- half the squared error summed over a patch's pixels,
averaged over the batch -- i.e. ``P^2 / 2`` times the per-pixel MSE (840x for 41x41 patches).
Learning rate 0.1 and weight decay 1e-4 are the paper's for this scale; with a per-pixel mean
the same learning rate would train hundreds of times slower. ``mse`` and ``l1`` are per-pixel means.

Theta. The paper does not give theta. At this loss scale most gradient elements exceed theta/lr,
so a step moves each weight by about theta (up to 10 theta with momentum 0.9), against He-init
weights of std sqrt(2 / (9 x 64)) = 0.06. On Set5 x2 patches (VDSR 5 x 16, 6 epochs of 19
steps, CPU) theta 1e-2 and 1e-3 left the net oscillating around bicubic (33.4 and 29-33.9 dB
vs 33.66), while 1e-4 climbed steadily to 34.9 dB; hence the default 1e-4.

Runtime. Precision, memory layout and compilation come in one :class:`vdsr.runtime.Runtime`,
applied by the same code on every device; validation always runs in exact fp32
(:func:`vdsr.runtime.exact_fp32`). On CUDA the patch set stays resident on the GPU when it takes
under half the free memory (else in pinned host memory) and the optimizer uses fused kernels.

Reproducibility and resume. Shuffling and augmentation of epoch ``e`` draw from a generator
seeded by ``(seed, e)`` only, the learning rate is a function of the step, and a checkpoint
(weights, optimizer, RNG states, history, position) is written atomically after every epoch,
every ``checkpoint_every_s`` seconds of training and when a stop is requested; a run interrupted
anywhere and resumed therefore ends with the same weights as an uninterrupted one. A checkpoint
that cannot be resumed (another recipe or data, :func:`vdsr.checkpoints.checkpoint_mismatch`) stops
the run before its first step with :class:`vdsr.checkpoints.CheckpointRefused`; ``start_over=True``
moves it aside to a dated name and trains from scratch. Nothing overwrites it unasked.

Several processes (torchrun). Under a ``torch.distributed`` process group (:mod:`vdsr.distributed`,
one process per GPU, NCCL; or gloo on the CPU) the loop is DistributedDataParallel, and the
global batch stays ``batch_size``: every process draws the same (seed, epoch) permutation and
augmentation and takes its own ``batch_size / world size`` columns of each batch. Each computes
the loss on its slice (a per-patch mean), DDP averages the gradients over the processes during
``backward`` -- the mean of equal-sized slice means is the batch mean, so the gradient is the
single-process one -- and clipping then acts on that averaged gradient. The same global batch
thus gives the same model on any number of processes, up to float rounding. All processes
validate; rank 0 alone reads and writes the checkpoint, shows progress and calls
``on_epoch_end``. On resume rank 0 sends the checkpoint to the others. Decisions to checkpoint
or stop mid-epoch are taken by all processes together, every ``LOG_EVERY`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vdsr.checkpoints import (
    CheckpointError,
    Position,
    checkpoint_to_resume,
    history_of,
    position_of,
    save_checkpoint,
    set_rng_states,
)
from vdsr.distributed import check_same_data
from vdsr.evaluate import to_uint8
from vdsr.inference import predict_y
from vdsr.metrics import psnr
from vdsr.models import ModelConfig, build_model, resolve_device
from vdsr.recipe import CLIP_MODES, LOSSES, OPTIMIZERS, SCHEDULES, TrainConfig  # noqa: F401 (re-exported)
from vdsr.runtime import Runtime, compiled, resolve_runtime, training_flags

log = logging.getLogger(__name__)

LOG_EVERY = 20  # steps between progress-bar updates, the only mid-epoch reads of GPU scalars
LONG_RUN_S = 12 * 3600  # a run estimated longer than this on a CPU gets a warning naming quicker options

Validation = dict[int, list[tuple[str, np.ndarray, np.ndarray]]]  # scale -> [(name, lr f32, hr u8)]


# --- numerics -----------------------------------------------------------------------------------


def step_decay_lr(epoch: int, base_lr: float, step_epochs: int, gamma: float) -> float:
    """Learning rate of ``epoch`` (1-based): ``base_lr`` for epochs 1..step_epochs, then times
    ``gamma`` for each further ``step_epochs`` (paper: 0.1, / 10 every 20 epochs)."""
    decays = (epoch - 1) // step_epochs  # completed decay periods before this epoch
    return base_lr * gamma**decays


def cosine_lr(step: int, total: int, base_lr: float, min_lr: float, warmup: int) -> float:
    """Cosine decay (Loshchilov & Hutter 2017, one cycle, no restarts) from ``base_lr`` after
    ``warmup`` steps to ``min_lr`` at step ``total - 1``; ``step`` is 0-based over the whole run."""
    if total - warmup <= 1:
        return base_lr
    progress = min(1.0, max(0, step - warmup) / (total - warmup - 1))
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def learning_rate(config: TrainConfig, epoch: int, step: int, steps: int) -> float:
    """The learning rate of ``step`` (0-based) of ``epoch`` (1-based) with ``steps`` per epoch.

    The schedule's value times a linear warm-up factor ``(t + 1) / warmup_steps`` over the first
    ``warmup_steps`` steps of the run (Goyal et al. 2017), ``t`` the step counted from the start.
    """
    t = (epoch - 1) * steps + step
    if config.lr_schedule == "cosine":
        lr = cosine_lr(t, config.epochs * steps, config.lr, config.min_lr, config.warmup_steps)
    else:
        lr = step_decay_lr(epoch, config.lr, config.lr_step_epochs, config.lr_gamma)
    if t < config.warmup_steps:
        lr *= (t + 1) / config.warmup_steps
    return lr


def clip_gradients_adjustable(parameters: Iterable[torch.Tensor], theta: float, lr: float) -> None:
    """Kim et al. Sec. 3.3: clip every gradient element to [-theta/lr, theta/lr], in place.

    A step then changes no weight by more than ``theta`` (plus momentum and weight decay), so
    the bound loosens as the learning rate decays. Gradients that are None are skipped. One fused
    call over all gradients (``clip_grad_value_`` with ``foreach``).
    """
    nn.utils.clip_grad_value_(parameters, theta / lr, foreach=True)


def clip_gradients(parameters: Iterable[torch.Tensor], mode: str, theta: float, lr: float) -> None:
    """``mode``: "adjustable" (above), "norm" (total 2-norm scaled down to ``theta``) or "none"."""
    if mode == "adjustable":
        clip_gradients_adjustable(parameters, theta, lr)
    elif mode == "norm":
        nn.utils.clip_grad_norm_(parameters, theta, foreach=True)
    elif mode != "none":
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")


def sr_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "l2", border: int = 0) -> torch.Tensor:
    """In fp32. ``l2``: the paper's 1/2 squared error summed over each patch, averaged over the
    batch; ``mse``: the per-pixel mean squared error; ``l1``: the per-pixel mean absolute error.

    ``border``: pixels left out at each side of the (N, C, H, W) patches, so that the loss sees only
    outputs whose receptive field lies inside the patch: Dong et al. train SRCNN without padding, on
    the valid output alone (for 9-5-5 the inner ``H - 16``; ``border`` 8 here, the network zero-padded)."""
    if border:
        if 2 * border >= min(prediction.shape[-2:]):
            raise ValueError(f"loss_border {border} leaves nothing of {tuple(prediction.shape[-2:])} patches: "
                             f"it must be below half the patch side")
        prediction = prediction[..., border:-border, border:-border]
        target = target[..., border:-border, border:-border]
    error = prediction.float() - target
    if kind == "l2":
        return 0.5 * error.square().sum() / prediction.shape[0]
    if kind == "mse":
        return error.square().mean()
    if kind == "l1":
        return error.abs().mean()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


# --- batches ------------------------------------------------------------------------------------


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """CPU generator of one epoch's shuffling and augmentation, a function of (seed, epoch) only."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def batch_order(n: int, steps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(steps, batch_size) patch indices: random permutations of all n patches, back to back."""
    passes = math.ceil(steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])
    return order[: steps * batch_size].view(steps, batch_size)


def place_patches(lr: np.ndarray, hr: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch arrays where batches are cut: on the GPU if they take under half its free
    memory, else pinned host memory; on the CPU as they are (no copy)."""
    lr_t, hr_t = torch.from_numpy(lr), torch.from_numpy(hr)
    if device.type != "cuda":
        return lr_t, hr_t
    free_bytes, _ = torch.cuda.mem_get_info(device)
    if lr_t.nbytes + hr_t.nbytes < free_bytes // 2:
        return lr_t.to(device), hr_t.to(device)
    log.info("patch set (%.1f GB) kept in pinned host memory", (lr_t.nbytes + hr_t.nbytes) / 1e9)
    return lr_t.pin_memory(), hr_t.pin_memory()


def get_batch(
    lr: torch.Tensor, hr: torch.Tensor, index: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input Y/255 and target HR/255 of the patches ``index``, float32 (B, 1, P, P) on ``device``."""
    if lr.device != device:  # pinned host memory: gather there, copy only the batch
        x = lr[index].pin_memory().to(device, non_blocking=True)
        y = hr[index].pin_memory().to(device, non_blocking=True)
    else:
        index = index.to(device)
        x, y = lr[index], hr[index]
    return x.float(), y.float() / 255.0


def augment(x: torch.Tensor, y: torch.Tensor, transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one of the 8 flips/rotations of the square to each input patch and its target.

    ``transform``: (B,) integers in [0, 8) on the patches' device; bit 0 transposes, bit 1 flips
    left-right, bit 2 flips upside-down -- together the 4 rotations and their mirror images.
    """
    pair = torch.cat([x, y], dim=1)  # (B, 2, P, P): transform both with one index
    for bit, transformed in ((0, lambda t: t.transpose(2, 3)), (1, lambda t: t.flip(3)), (2, lambda t: t.flip(2))):
        chosen = ((transform >> bit) & 1).bool().view(-1, 1, 1, 1)
        pair = torch.where(chosen, transformed(pair), pair)
    return pair[:, :1], pair[:, 1:]


# --- one step, validation -----------------------------------------------------------------------


def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """SGD with momentum (paper), Adam or AdamW; fused CUDA kernels on the GPU."""
    fast = {"fused": True} if device.type == "cuda" else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fast
        )
    adam = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fast)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    clip: str,
    clip_theta: float,
    autocast: contextlib.AbstractContextManager,
    loss: str = "l2",
    loss_border: int = 0,
) -> torch.Tensor:
    """Forward (under ``autocast``), backward, clip, step; returns the loss (:func:`sr_loss`), detached
    (not read here)."""
    with autocast:
        value = sr_loss(model(x), y, loss, loss_border)
    value.backward()
    clip_gradients(model.parameters(), clip, clip_theta, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return value.detach()


@torch.no_grad()
def validate(model: nn.Module, validation: Validation, device: torch.device) -> dict[int, float]:
    """Mean PSNR (dB) per scale on whole images, by the protocol of :mod:`vdsr.evaluate`.

    Exact fp32 (:func:`vdsr.runtime.exact_fp32`: no autocast, no TF32); the estimate is clipped and
    rounded to uint8 (:func:`to_uint8`) and compared with the uint8 HR luma with ``crop_border = scale``.
    """
    was_training = model.training
    model.eval()
    means = {}
    for scale, images in sorted(validation.items()):
        values = []
        for _name, lr, hr in images:
            estimate = predict_y(model, lr, device, tile=0)  # the one inference path, in exact fp32
            values.append(psnr(to_uint8(estimate), hr, crop_border=scale))
        means[scale] = float(np.mean(values))
    model.train(was_training)
    return means


# --- the loop -----------------------------------------------------------------------------------


class TrainingInterrupted(Exception):
    """Training stopped on request (Ctrl-C, SIGTERM) at ``position``; the checkpoint, if any, holds it."""

    def __init__(self, position: Position, checkpoint_path: Path | None) -> None:
        self.position = position
        self.checkpoint_path = checkpoint_path
        where = f"; checkpoint {checkpoint_path} holds it" if checkpoint_path else " (no checkpoint)"
        super().__init__(f"training stopped after {position}{where}")


@dataclass
class TrainResult:
    model: nn.Module  # the trained network (the averaged weights when ema_decay > 0), unwrapped, on the training device, eval mode
    history: list[dict[str, float]]  # one row per epoch, earlier runs' epochs included
    resumed_from: int  # epochs taken from the checkpoint (0: trained from scratch)
    resumed_at: Position = dataclasses.field(default_factory=Position)  # where the checkpoint stood
    checkpoint_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # the caller's, from the checkpoint


def duration(seconds: float) -> str:
    """``3 min``, ``2.4 h``, ``3.4 days``: a duration in words for estimates."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def announce_estimate(patches_per_s: float, remaining_steps: int, batch_size: int, runtime: Runtime) -> None:
    """Say what the rest of the run costs in time at the measured speed, and warn of days on a CPU."""
    seconds = remaining_steps * batch_size / patches_per_s
    finish = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
    log.info("speed: %.0f patches/s on %s; the remaining %d steps need about %s (plus validation), "
             "until about %s", patches_per_s, runtime, remaining_steps, duration(seconds),
             finish.strftime("%a %d %b %H:%M"))
    if seconds > LONG_RUN_S and not runtime.cuda:
        log.warning("WARNING: that is %s of training on the CPU: these settings (the paper's schedule by "
                    "default) are made for a GPU. Quicker: the CPU preset `make release-cpu` (hours), "
                    "`make smoke` (minutes), or a GPU; see README 'How long training takes'. Ctrl-C stops "
                    "with a checkpoint, and the same command resumes.", duration(seconds))


@contextlib.contextmanager
def progress_bar(total: int, initial: int, enabled: bool) -> Iterator[tqdm]:
    """One bar over the whole run's steps (its ETA is the run's); while it is shown, log lines go
    through ``tqdm.write`` so that they print above it instead of into it."""
    bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled, dynamic_ncols=True)
    try:
        with logging_redirect_tqdm() if enabled else contextlib.nullcontext():
            yield bar
    finally:
        bar.close()


def _agree(flags: list[bool], world_size: int, device: torch.device) -> list[bool]:
    """Each flag true if it is true in any process (a collective under DDP; as given for one process)."""
    if world_size == 1:
        return flags
    votes = torch.tensor([int(flag) for flag in flags], device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return [bool(vote) for vote in votes.tolist()]


def _global_sum(value: torch.Tensor, world_size: int) -> float:
    """``value`` summed over the processes (a collective under DDP), as a Python float."""
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
    return float(value.item())


def make_ema(model: nn.Module, decay: float) -> AveragedModel | None:
    """Weight averaging: an exponential moving average of the weights (Polyak & Juditsky 1992;
    BasicSR's ``net_g_ema``), ``ema = decay * ema + (1 - decay) * w`` after every step, starting
    equal to the weights; :class:`torch.optim.swa_utils.AveragedModel`. None when ``decay`` is 0."""
    if decay == 0:
        return None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema.update_parameters(model)  # n_averaged 0 -> 1: a copy of the weights
    return ema


@dataclass
class State:
    """What a run starts from: fresh, or read from a checkpoint (rank 0's, sent to all)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: AveragedModel | None  # the averaged weights when config.ema_decay > 0
    history: list[dict[str, float]]
    position: Position
    extra: dict[str, Any]  # the caller's plain data stored with the checkpoint


def _start(
    model_config: ModelConfig, config: TrainConfig, runtime: Runtime, checkpoint_path: Path | None, data_id: str,
    rank: int, world_size: int, start_over: bool = False,
) -> State:
    """Model, optimizer and averaged weights from scratch, or from the checkpoint (read by rank 0,
    sent to all); also the history, position and caller's extra stored with it. A checkpoint that
    cannot be resumed stops every process with rank 0's :class:`CheckpointError` (its message)."""
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(runtime.device, memory_format=runtime.memory_format)
    optimizer = make_optimizer(model, config, runtime.device)
    payload, refused = None, None
    if rank == 0 and checkpoint_path is not None:
        try:
            payload = checkpoint_to_resume(checkpoint_path, model_config, config, data_id, start_over=start_over)
        except CheckpointError as error:
            refused = error
    if world_size > 1:  # the others learn rank 0's refusal too, instead of waiting for a checkpoint
        shared = [payload, None if refused is None else str(refused)]
        dist.broadcast_object_list(shared, src=0, device=runtime.device if runtime.cuda else None)
        payload = shared[0]
        if refused is None and shared[1] is not None:
            refused = CheckpointError(shared[1])
    if refused is not None:
        raise refused
    if payload is None:
        return State(model, optimizer, make_ema(model, config.ema_decay), [], Position(), {})
    model.load_state_dict(payload["model"])
    kernels = {key: optimizer.param_groups[0].get(key) for key in ("fused", "foreach")}
    for group in payload["optimizer"]["param_groups"]:
        group.update(kernels)  # this device's kernels, wherever the checkpoint was made
    optimizer.load_state_dict(payload["optimizer"])
    set_rng_states(payload["rng"])
    ema = make_ema(model, config.ema_decay)  # a warm start's checkpoint has none yet: the weights
    if ema is not None and payload.get("ema"):
        ema.module.load_state_dict(payload["ema"]["state"])
        ema.n_averaged.fill_(int(payload["ema"]["n_averaged"]))
    position = position_of(payload)
    log.info("resuming from %s after %s", checkpoint_path, position)
    return State(model, optimizer, ema, history_of(payload), position, dict(payload["extra"]))


@dataclass(frozen=True)
class Plan:
    """The fixed shape of a run, decided before its first step: this process's place among the
    processes, how batches are cut and where checkpoints go."""

    model_config: ModelConfig
    config: TrainConfig
    runtime: Runtime
    n: int  # patches
    batch_size: int  # global: all processes together
    steps: int  # per epoch
    rank: int
    world_size: int
    checkpoint_path: Path | None
    checkpoint_every_s: float | None
    checkpoint_extra: dict[str, Any]  # the caller's (read at each write: on_start may change it), over the checkpoint's
    data_id: str
    stop: Callable[[], bool] | None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def mine(self) -> slice:
        """This process's columns of each batch."""
        local = self.batch_size // self.world_size
        return slice(self.rank * local, (self.rank + 1) * local)

    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop()


@dataclass
class Loop:
    """What a run changes as it goes: the one mutable object of :func:`train`."""

    state: State  # model, optimizer, averaged weights, history; ``state.position``: where this run began
    step_model: nn.Module  # the model as stepped: DDP and compilation around ``state.model``
    lr_patches: torch.Tensor
    hr_patches: torch.Tensor
    bar: tqdm
    run_start: float = dataclasses.field(default_factory=time.perf_counter)
    last_checkpoint: float = dataclasses.field(default_factory=time.monotonic)
    run_steps: int = 0  # steps taken by this run (not by the runs it resumes)
    estimated: bool = False  # the time estimate has been said

    def elapsed(self) -> float:
        """Training and validation time of all runs so far, this one included."""
        return self.state.position.elapsed_s + time.perf_counter() - self.run_start


@dataclass
class EpochSteps:
    """What the steps of one epoch leave for its end: the training loss and the time they took."""

    train_loss: float
    lr: float  # of the last step
    first: int  # the first step this run took (a resumed epoch starts mid-way)
    start: float  # perf_counter at the first step
    train_time: float


def _plan(train_lr: np.ndarray, train_hr: np.ndarray, model_config: ModelConfig, config: TrainConfig,
          runtime: Runtime, **fixed: Any) -> Plan:
    """Check the patches and the batch against the processes; ``fixed``: the other :class:`Plan` fields."""
    if train_lr.shape != train_hr.shape or train_lr.ndim != 4 or train_lr.shape[1] != 1:
        raise ValueError(f"patches must be (N, 1, P, P) alike, got lr {train_lr.shape} and hr {train_hr.shape}")
    if train_lr.shape[2] != train_lr.shape[3]:
        raise ValueError(f"patches must be square for the rotations, got {train_lr.shape[2:]}")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    n = train_lr.shape[0]
    batch_size = min(config.batch_size, n)  # global: all processes together
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} processes")
    if world_size > 1:
        check_same_data(fixed["data_id"], world_size)
    return Plan(model_config, config, runtime, n, batch_size, config.steps_per_epoch or n // batch_size, rank,
                world_size, **fixed)


def _loop(plan: Plan, state: State, train_lr: np.ndarray, train_hr: np.ndarray, bar: tqdm) -> Loop:
    """The model as stepped (DDP averages the gradients over the processes during backward;
    compiled around it) and the patches where batches are cut."""
    step_model: nn.Module = state.model
    if plan.world_size > 1:
        step_model = DistributedDataParallel(state.model, device_ids=[plan.device] if plan.runtime.cuda else None)
    step_model = compiled(step_model, plan.runtime)
    lr_patches, hr_patches = place_patches(train_lr, train_hr, plan.device)
    log.info("training %s on %d patches (%d steps of %d per epoch%s) on %s, epochs %d..%d",
             plan.model_config, plan.n, plan.steps, plan.batch_size,
             f", {plan.batch_size // plan.world_size} in each of {plan.world_size} processes"
             if plan.world_size > 1 else "", plan.runtime, state.position.epoch + 1, plan.config.epochs)
    return Loop(state, step_model, lr_patches, hr_patches, bar)


def _write_checkpoint(plan: Plan, loop: Loop, position: Position) -> None:
    """Rank 0 writes the checkpoint (when there is a path) at ``position``."""
    if plan.rank == 0 and plan.checkpoint_path is not None:
        s = loop.state
        save_checkpoint(plan.checkpoint_path, model=s.model, optimizer=s.optimizer, ema=s.ema,
                        model_config=plan.model_config, config=plan.config, data_id=plan.data_id, position=position,
                        history=s.history, extra={**s.extra, **plan.checkpoint_extra}, steps_per_epoch=plan.steps)
    loop.last_checkpoint = time.monotonic()


def _check_and_report(plan: Plan, loop: Loop, epoch: int, step: int, steps: EpochSteps, loss: torch.Tensor,
                      first_bad_step: torch.Tensor) -> None:
    """Every LOG_EVERY steps: stop on a non-finite loss (all processes together, at the first bad
    step of any), update the bar and, once, say how long the run will take. Reading a GPU scalar
    waits for all queued work, so it is done only here; in between the CPU queues the next steps."""
    config, total = plan.config, plan.steps
    if plan.world_size > 1:
        dist.all_reduce(first_bad_step, op=dist.ReduceOp.MIN)
    bad = int(first_bad_step.item())
    if bad < total:
        raise FloatingPointError(f"epoch {epoch}, step {bad + 1}/{total}: the loss is not finite (nan or inf) at "
                                 f"lr {steps.lr:g}; lower train.lr or clip the gradients (train.clip)")
    rate = (step + 1 - steps.first) * plan.batch_size / (time.perf_counter() - steps.start)
    loop.bar.set_postfix(epoch=f"{epoch}/{config.epochs}", loss=f"{loss.item():.4g}", lr=f"{steps.lr:.3g}",
                         patches_s=f"{rate:.0f}")
    if not loop.estimated and plan.rank == 0:
        run_rate = loop.run_steps * plan.batch_size / (time.perf_counter() - loop.run_start)
        remaining = (config.epochs - epoch) * total + total - (step + 1)
        announce_estimate(run_rate, remaining, plan.batch_size, plan.runtime)
    loop.estimated = True


def _checkpoint_or_stop_mid_epoch(plan: Plan, loop: Loop, epoch: int, step: int, loss_sum: torch.Tensor) -> None:
    """After ``step``: a checkpoint when ``checkpoint_every_s`` have passed or a stop was asked for
    (decided by all processes together); on a stop, :class:`TrainingInterrupted`."""
    every = plan.checkpoint_every_s
    due = every is not None and time.monotonic() - loop.last_checkpoint >= every
    halt, due = _agree([plan.stop_requested(), due], plan.world_size, plan.device)
    if halt or due:
        position = Position(epoch - 1, step + 1, _global_sum(loss_sum, plan.world_size), elapsed_s=loop.elapsed())
        _write_checkpoint(plan, loop, position)
        if halt:
            raise TrainingInterrupted(position, plan.checkpoint_path)


def _train_epoch(plan: Plan, loop: Loop, epoch: int) -> EpochSteps:
    """The steps of ``epoch`` (from the checkpoint's step when it resumes mid-way): set the
    learning rate, cut and augment the batch, step, average the weights; check and report every
    LOG_EVERY steps, checkpoint or stop on request in between."""
    config, device, steps, at = plan.config, plan.device, plan.steps, loop.state.position
    state = loop.state
    resumed = epoch == at.epoch + 1
    first = at.step if resumed else 0
    # the epoch's random draws, from (seed, epoch) alone: the same in every process
    generator = epoch_generator(config.seed, epoch)
    order = batch_order(plan.n, steps, plan.batch_size, generator)  # (steps, B)
    transforms = torch.randint(0, 8, (steps, plan.batch_size), generator=generator)  # (steps, B)
    order = order[:, plan.mine].to(loop.lr_patches.device)  # (steps, B / processes)
    transforms = transforms[:, plan.mine].to(device)

    loss_sum = torch.full((), at.loss_sum if resumed and plan.rank == 0 else 0.0, device=device)
    first_bad_step = torch.full((), steps, device=device)  # steps: none yet
    done = EpochSteps(0.0, 0.0, first, time.perf_counter(), 0.0)
    for step in range(first, steps):
        done.lr = learning_rate(config, epoch, step, steps)
        for group in state.optimizer.param_groups:
            group["lr"] = done.lr
        x, y = get_batch(loop.lr_patches, loop.hr_patches, order[step], device)
        if config.augment:
            x, y = augment(x, y, transforms[step])
        x = x.contiguous(memory_format=plan.runtime.memory_format)
        loss = train_step(loop.step_model, state.optimizer, x, y, lr=done.lr, clip=config.clip, loss=config.loss,
                          loss_border=config.loss_border, clip_theta=config.clip_theta,
                          autocast=plan.runtime.autocast())
        if state.ema is not None:
            state.ema.update_parameters(state.model)
        loss_sum += loss
        first_bad_step = torch.where((first_bad_step == steps) & ~torch.isfinite(loss), step, first_bad_step)
        loop.bar.update(1)
        loop.run_steps += 1
        boundary = (step + 1) % LOG_EVERY == 0 or step + 1 == steps
        if boundary:
            _check_and_report(plan, loop, epoch, step, done, loss, first_bad_step)
        if step + 1 < steps and (plan.world_size == 1 or boundary):  # mid-epoch: checkpoint or stop?
            _checkpoint_or_stop_mid_epoch(plan, loop, epoch, step, loss_sum)

    if plan.world_size > 1:  # the mean of the slices' losses is the batch loss
        dist.all_reduce(loss_sum)
    done.train_loss = loss_sum.item() / steps / plan.world_size  # waits for the GPU
    done.train_time = time.perf_counter() - done.start
    return done


def _end_epoch(plan: Plan, loop: Loop, epoch: int, done: EpochSteps, validation: Validation) -> dict[str, float]:
    """Validate (the averaged weights, and the raw ones too when there are both), append the
    epoch's history row, log it and write the checkpoint; returns the row."""
    state, device = loop.state, plan.device
    val = validate(state.model if state.ema is None else state.ema.module, validation, device)
    row = {"epoch": epoch, "train_loss": done.train_loss, "lr": done.lr}
    row.update({f"val_psnr_x{scale}": value for scale, value in val.items()})
    if state.ema is not None:  # val_psnr_x<s>: the averaged weights (the run's output); also the raw ones
        raw = validate(state.model, validation, device)
        row.update({f"val_psnr_raw_x{scale}": value for scale, value in raw.items()})
    row.update(patches_per_s=(plan.steps - done.first) * plan.batch_size / done.train_time,
               time_s=time.perf_counter() - done.start, elapsed_s=loop.elapsed())
    state.history.append(row)
    log.info("epoch %d: loss %.5f, lr %.3g, val psnr %s%s, %.0f patches/s", epoch, done.train_loss, done.lr,
             " ".join(f"x{s} {v:.2f}" for s, v in val.items()) or "-",
             "" if state.ema is None else " (averaged weights; raw " +
             " ".join(f"x{s} {v:.2f}" for s, v in raw.items()) + ")", row["patches_per_s"])
    _write_checkpoint(plan, loop, Position(epoch, elapsed_s=row["elapsed_s"]))
    return row


def train(
    train_lr: np.ndarray,
    train_hr: np.ndarray,
    validation: Validation,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    device: str | torch.device = "auto",
    runtime: Runtime | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_every_s: float | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    data_id: str = "",
    on_start: Callable[[Position, dict[str, Any]], None] | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    stop: Callable[[], bool] | None = None,
    progress: bool = True,
    start_over: bool = False,
) -> TrainResult:
    """Train ``model_config`` on the patches ``train_lr`` -> ``train_hr`` with ``config``.

    ``train_lr``: (N, 1, P, P) float16 or float32 network inputs, Y / 255; ``train_hr``: (N, 1,
    P, P) uint8 HR luma; P x P square (the rotations need it). ``validation``: {scale: [(name,
    lr (H, W) float32, hr (H, W) uint8)]}, scored after every epoch. ``runtime``: precision, layout,
    compilation and device (default: fp32, NCHW, eager on ``device``). ``checkpoint_path``: written
    after every epoch, every ``checkpoint_every_s`` seconds of training and on a stop, with
    ``checkpoint_extra`` (the caller's plain data, over what the checkpoint held); resumed from
    when compatible. ``data_id`` identifies the data (e.g. its sha256) for that check. A checkpoint
    that cannot be resumed (other settings or data, unreadable) raises
    :class:`vdsr.checkpoints.CheckpointRefused` naming the reasons, before any step, and is left as
    it is; with ``start_over`` it is moved aside to a dated name instead and training starts from
    scratch (a resumable one is resumed either way).
    ``on_start(position, extra)`` is called once the checkpoint is read (``extra``: what an
    earlier run stored). ``on_epoch_end(epoch, row)`` is called after the checkpoint with the
    epoch's history row: epoch, train_loss, lr, val_psnr_x<s>..., patches_per_s, time_s (the
    epoch's) and elapsed_s (training and validation of all runs so far). ``stop()`` is polled
    between steps: when it returns True the run writes a checkpoint and raises
    :class:`TrainingInterrupted`. Raises
    ``FloatingPointError`` naming epoch and step on a non-finite loss.

    Under a process group (:func:`vdsr.distributed.process_group`) each process trains on its slice
    of every batch (``batch_size`` must be a multiple of the number of processes) on its own
    device; all return the same result, and only rank 0 touches the checkpoint, calls the
    callbacks and shows progress (see the module docstring).
    """
    if runtime is None:
        runtime = resolve_runtime(resolve_device(device), "fp32", channels_last=False)
    plan = _plan(train_lr, train_hr, model_config, config, runtime, stop=stop, data_id=data_id,
                 checkpoint_path=Path(checkpoint_path) if checkpoint_path is not None else None,
                 checkpoint_every_s=checkpoint_every_s,
                 checkpoint_extra={} if checkpoint_extra is None else checkpoint_extra)
    with training_flags(runtime):
        state = _start(model_config, config, runtime, plan.checkpoint_path, data_id, plan.rank, plan.world_size,
                       start_over)
        if plan.rank == 0 and on_start is not None:
            on_start(state.position, state.extra)
        done_steps = state.position.epoch * plan.steps + state.position.step
        with progress_bar(config.epochs * plan.steps, done_steps, progress and plan.rank == 0) as bar:
            loop = _loop(plan, state, train_lr, train_hr, bar)
            state.model.train()
            for epoch in range(state.position.epoch + 1, config.epochs + 1):
                steps = _train_epoch(plan, loop, epoch)
                row = _end_epoch(plan, loop, epoch, steps, validation)
                if plan.rank == 0 and on_epoch_end is not None:
                    on_epoch_end(epoch, dict(row))
                if epoch < config.epochs and _agree([plan.stop_requested()], plan.world_size, runtime.device)[0]:
                    raise TrainingInterrupted(Position(epoch, elapsed_s=row["elapsed_s"]), plan.checkpoint_path)

    state.model.eval()
    # the run's output is the averaged copy when there is one; the raw weights stay in the checkpoint
    model = state.model if state.ema is None else state.ema.module.eval()
    return TrainResult(model=model, history=state.history, resumed_from=state.position.epoch,
                       resumed_at=state.position, checkpoint_extra=state.extra)


# --- for the train stage: stopping on a signal, the run's summary --------------------------------


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks training to stop after the current step, with a checkpoint;
    a second one stops at once. Called, it says whether a stop was asked for (``train(stop=...)``)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\ntrain: {signal.Signals(signum).name} received, stopping after this step with a checkpoint "
              "(again to stop at once, without one)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.signum is not None


def summary_metrics(history: list[dict[str, float]]) -> dict[str, Any]:
    """metrics/train_<name>.json: the last epoch's loss and validation PSNR, epochs, wall time
    (all runs, resumed ones too) and the median speed."""
    final = history[-1]
    return {
        "train_loss": final["train_loss"],
        **{key: round(value, 4) for key, value in final.items() if key.startswith("val_psnr_x")},
        "epochs": len(history),
        "wall_time_s": round(final["elapsed_s"], 1),
        "patches_per_s": round(statistics.median(row["patches_per_s"] for row in history), 1),
    }

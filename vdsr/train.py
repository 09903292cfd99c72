"""The training loop: VDSR's recipe (Kim et al. 2016, Sec. 3.3 and 4.1), written like nanoGPT's.

Recipe. Multi-scale patches (all scales shuffled together), random flips and 90-degree rotations
per patch, the paper's loss, SGD with momentum 0.9 and weight decay 1e-4 (or Adam), learning
rate 0.1 divided by 10 every 20 epochs, and *adjustable gradient clipping*: each gradient
element is clipped to [-theta/lr, theta/lr], so that the gradient part of a step, lr x g, stays
within theta whatever the learning rate. Only the loss gradient is clipped: the optimizer adds
weight decay afterwards, inside its step.

Loss. The paper's ``1/2 ||r - f(x)||^2`` -- half the squared error summed over a patch's pixels,
averaged over the batch -- i.e. ``P^2 / 2`` times the per-pixel MSE (840x for 41x41 patches).
Learning rate 0.1 and weight decay 1e-4 are the paper's for this scale; with a per-pixel mean
the same learning rate would train hundreds of times slower.

Theta. The paper does not give theta. At this loss scale most gradient elements exceed theta/lr,
so a step moves each weight by about theta (up to 10 theta with momentum 0.9), against He-init
weights of std sqrt(2 / (9 x 64)) = 0.06. On Set5 x2 patches (VDSR 5 x 16, 6 epochs of 19
steps, CPU) theta 1e-2 and 1e-3 left the net oscillating around bicubic (33.4 and 29-33.9 dB
vs 33.66), while 1e-4 climbed steadily to 34.9 dB; hence the default 1e-4.

Runtime. On CUDA: bf16 autocast, channels_last, the patch set resident on the GPU when it takes
under half the free memory (else in pinned host memory), fused optimizers, cuDNN autotuning (so
CUDA runs are not bit-reproducible). On the CPU the same code runs in fp32 with deterministic
algorithms: two runs with the same settings give bit-identical weights and metrics.

Reproducibility and resume. Shuffling and augmentation of epoch ``e`` draw from a generator
seeded by ``(seed, e)`` only, and a checkpoint (weights, optimizer, RNG states, history) is
written atomically after every epoch; a run interrupted and resumed therefore ends with the
same weights as an uninterrupted one. A checkpoint made with other settings is ignored with a
warning (and overwritten after the next epoch), see :func:`checkpoint_mismatch`.

Several processes (torchrun). Under a ``torch.distributed`` process group (:func:`process_group`,
one process per GPU, NCCL; or gloo on the CPU) the loop is DistributedDataParallel, and the
global batch stays ``batch_size``: every process draws the same (seed, epoch) permutation and
augmentation and takes its own ``batch_size / world size`` columns of each batch. Each computes
the loss on its slice (a per-patch mean), DDP averages the gradients over the processes during
``backward`` -- the mean of equal-sized slice means is the batch mean, so the gradient is the
single-process one -- and clipping then acts on that averaged gradient. The same global batch
thus gives the same model on any number of processes, up to float rounding (the batch sum is
added up in another order). All processes validate (the weights are the same everywhere, and
it takes no longer than waiting for rank 0); rank 0 alone reads and writes the checkpoint,
shows progress and calls ``on_epoch_end``. On resume rank 0 sends the checkpoint to the others,
so that nodes need not share a file system.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vdsr.evaluate import to_uint8
from vdsr.io import remove_stale_temporaries
from vdsr.metrics import psnr
from vdsr.models import ModelConfig, build_model, resolve_device, save_atomic, unwrapped_state_dict
from vdsr.upscale import predict_y

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam")
CLIP_MODES = ("adjustable", "norm", "none")
CHECKPOINT_FORMAT = "vdsr-checkpoint"
CHECKPOINT_VERSION = 1
LOG_EVERY = 20  # steps between progress-bar updates, the only mid-epoch reads of GPU scalars

Validation = dict[int, list[tuple[str, np.ndarray, np.ndarray]]]  # scale -> [(name, lr f32, hr u8)]


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"  # "sgd" (paper) | "adam"
    lr: float = 0.1  # initial learning rate (paper: 0.1)
    momentum: float = 0.9  # SGD momentum (paper: 0.9); Adam keeps its default betas
    weight_decay: float = 1e-4  # L2 penalty, added to the gradient after clipping (paper: 1e-4)
    lr_step_epochs: int = 20  # lr multiplied by lr_gamma every this many epochs (paper: 20)
    lr_gamma: float = 0.1  # (paper: 0.1)
    epochs: int = 80  # (paper: 80)
    batch_size: int = 64  # (paper: 64)
    clip: str = "adjustable"  # "adjustable" (paper) | "norm" | "none"
    clip_theta: float = 1e-4  # adjustable: theta (not given in the paper); norm: the max gradient norm
    augment: bool = True  # random flips and 90-degree rotations, per patch
    steps_per_epoch: int = 0  # 0: one pass, floor(N / batch_size) batches; > 0: that many batches
    seed: int = 0  # model init, shuffling and augmentation

    def __post_init__(self) -> None:
        checks = [
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            (self.clip in CLIP_MODES, "clip", f"one of {CLIP_MODES}"),
            (self.lr > 0, "lr", "> 0"),
            (0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay", ">= 0"),
            (self.lr_step_epochs >= 1, "lr_step_epochs", ">= 1"),
            (0 < self.lr_gamma <= 1, "lr_gamma", "in (0, 1]"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.clip_theta > 0, "clip_theta", "> 0"),
            (self.steps_per_epoch >= 0, "steps_per_epoch", ">= 0"),
            (self.seed >= 0, "seed", ">= 0"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {expected}, got {getattr(self, name)!r}")


# --- numerics -----------------------------------------------------------------------------------


def step_decay_lr(epoch: int, base_lr: float, step_epochs: int, gamma: float) -> float:
    """Learning rate of ``epoch`` (1-based): ``base_lr`` for epochs 1..step_epochs, then times
    ``gamma`` for each further ``step_epochs`` (paper: 0.1, / 10 every 20 epochs)."""
    decays = (epoch - 1) // step_epochs  # completed decay periods before this epoch
    return base_lr * gamma**decays


def clip_gradients_adjustable(parameters: Iterable[torch.Tensor], theta: float, lr: float) -> None:
    """Kim et al. Sec. 3.3: clip every gradient element to [-theta/lr, theta/lr], in place.

    A step then changes no weight by more than ``theta`` (plus momentum and weight decay), so
    the bound loosens as the learning rate decays. Gradients that are None are skipped.
    """
    bound = theta / lr
    for p in parameters:
        if p.grad is not None:
            p.grad.clamp_(-bound, bound)


def clip_gradients(parameters: Iterable[torch.Tensor], mode: str, theta: float, lr: float) -> None:
    """``mode``: "adjustable" (above), "norm" (total 2-norm scaled down to ``theta``) or "none"."""
    if mode == "adjustable":
        clip_gradients_adjustable(parameters, theta, lr)
    elif mode == "norm":
        nn.utils.clip_grad_norm_(parameters, theta)
    elif mode != "none":
        raise ValueError(f"clip mode must be one of {CLIP_MODES}, got {mode!r}")


def sr_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's loss: 1/2 the squared error summed over each patch, averaged over the batch."""
    return 0.5 * (prediction.float() - target).square().sum() / prediction.shape[0]


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
    """SGD with momentum (paper) or Adam; fused CUDA kernels on the GPU."""
    fast = {"fused": True} if device.type == "cuda" else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fast
        )
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fast)


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
) -> torch.Tensor:
    """Forward, backward, clip, step; returns the loss as a detached tensor (not read here)."""
    with autocast:
        loss = sr_loss(model(x), y)
    loss.backward()
    clip_gradients(model.parameters(), clip, clip_theta, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def validate(model: nn.Module, validation: Validation, device: torch.device) -> dict[int, float]:
    """Mean PSNR (dB) per scale on whole images, by the protocol of :mod:`vdsr.evaluate`.

    fp32, no autocast; the estimate is clipped and rounded to uint8 (:func:`to_uint8`) and
    compared with the uint8 HR luma with ``crop_border = scale``.
    """
    was_training = model.training
    model.eval()
    means = {}
    for scale, images in sorted(validation.items()):
        values = []
        for _name, lr, hr in images:
            estimate = predict_y(model, lr, device, tile=0, amp=False)  # the one inference path (fp32)
            values.append(psnr(to_uint8(estimate), hr, crop_border=scale))
        means[scale] = float(np.mean(values))
    model.train(was_training)
    return means


# --- checkpoints --------------------------------------------------------------------------------


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
    model_config: ModelConfig,
    config: TrainConfig,
    data_id: str,
    epoch: int,
    history: list[dict[str, float]],
) -> None:
    """Everything needed to continue after ``epoch``, written atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": dataclasses.asdict(model_config),
        "train_config": dataclasses.asdict(config),
        "data_id": data_id,
        "epoch": epoch,
        "history": history,
        "model": unwrapped_state_dict(model),
        "optimizer": optimizer.state_dict(),
        "rng": rng_states(),
    }
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
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')!r}, this code reads "
                              f"{CHECKPOINT_VERSION}; delete it to train from scratch")
    return payload


def checkpoint_mismatch(
    payload: dict[str, Any], model_config: ModelConfig, config: TrainConfig, data_id: str
) -> list[str]:
    """Why a checkpoint cannot be continued under these settings; empty when it can.

    Compatible means: same model config, same training config except ``epochs`` (a run may be
    extended: nothing before epoch e depends on the total), same ``data_id``, and no more
    epochs done than asked for.
    """
    reasons = []
    for section, saved, current in (
        ("model", payload["model_config"], dataclasses.asdict(model_config)),
        ("train", payload["train_config"], dataclasses.asdict(config)),
    ):
        for key, value in current.items():
            if key != "epochs" and saved.get(key) != value:
                reasons.append(f"{section}.{key} was {saved.get(key)!r}, now {value!r}")
    if payload["data_id"] != data_id:
        reasons.append(f"training data was {payload['data_id'] or '?'}, now {data_id or '?'}")
    if payload["epoch"] > config.epochs:
        reasons.append(f"it holds {payload['epoch']} epochs, more than epochs = {config.epochs}")
    return reasons


def checkpoint_to_resume(
    path: Path, model_config: ModelConfig, config: TrainConfig, data_id: str
) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if training can continue from it; None if there is none or it
    was made with other settings (with a warning: it is overwritten after the next epoch).

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


@contextlib.contextmanager
def runtime_switches(device: torch.device) -> Iterator[contextlib.AbstractContextManager]:
    """Yield the autocast context; set cuDNN autotuning (CUDA) or deterministic algorithms (CPU)
    for the duration only, restoring torch's global flags afterwards."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    benchmark = torch.backends.cudnn.benchmark
    try:
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fastest conv algorithms: not bit-reproducible
            yield torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            torch.use_deterministic_algorithms(True)
            # Deterministic mode also NaN-fills every new buffer (a debugging aid, ~10% of a CPU
            # step); results do not depend on it, since nothing reads memory it did not write.
            torch.utils.deterministic.fill_uninitialized_memory = False
            yield contextlib.nullcontext()  # fp32
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.benchmark = benchmark


# --- several processes (torchrun) ---------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's processes."""

    rank: int = 0  # 0 .. size - 1 over all nodes; rank 0 writes the outputs
    local_rank: int = 0  # on this node: the GPU it uses
    size: int = 1  # processes in all


def torchrun_world(environ: Mapping[str, str]) -> World:
    """RANK, LOCAL_RANK and WORLD_SIZE as torchrun sets them; one process when they are unset."""
    size = int(environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(rank=int(environ["RANK"]), local_rank=int(environ["LOCAL_RANK"]), size=size)


def process_device(name: str, world: World) -> torch.device:
    """This process's device: ``name`` for one process (:func:`resolve_device`); among several,
    ``auto`` and ``cuda`` mean cuda:LOCAL_RANK (one GPU per process on each node) and ``cpu`` the CPU."""
    if world.size == 1:
        return resolve_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"device {name!r} names one GPU, but each of the {world.size} processes uses its own "
                         "(cuda:LOCAL_RANK): use auto or cuda")
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {world.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                         "start at most that many processes per node")
    return torch.device("cuda", world.local_rank)


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block: NCCL on CUDA, gloo on the CPU; nothing for one process.

    On a normal exit every process waits at a barrier for the others -- rank 0 for one writes the
    outputs after training -- so the job ends only when they are complete. On an error a process
    leaves at once, and torchrun stops the others.
    """
    if world.size == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_same_data(data_id: str, world_size: int) -> None:
    """Stop unless all processes were given the same ``data_id`` (on other nodes, other files)."""
    ids: list[Any] = [None] * world_size
    dist.all_gather_object(ids, data_id)
    if len(set(ids)) > 1:
        raise ValueError("the processes were given different training data (data_id by rank: "
                         f"{', '.join(f'{rank}: {id_}' for rank, id_ in enumerate(ids))})")


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: nn.Module  # the trained network, unwrapped, on the training device, in eval mode
    history: list[dict[str, float]]  # one row per epoch, earlier runs' epochs included
    resumed_from: int  # epochs taken from the checkpoint (0: trained from scratch)


def train(
    train_lr: np.ndarray,
    train_hr: np.ndarray,
    validation: Validation,
    model_config: ModelConfig,
    config: TrainConfig,
    *,
    device: str | torch.device = "auto",
    checkpoint_path: str | Path | None = None,
    data_id: str = "",
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = True,
    compile: bool = False,
) -> TrainResult:
    """Train ``model_config`` on the patches ``train_lr`` -> ``train_hr`` with ``config``.

    ``train_lr``: (N, 1, P, P) float16 or float32 network inputs, Y / 255; ``train_hr``: (N, 1,
    P, P) uint8 HR luma; P x P square (the rotations need it). ``validation``: {scale: [(name,
    lr (H, W) float32, hr (H, W) uint8)]}, scored after every epoch. ``checkpoint_path``:
    written after every epoch and resumed from when compatible. ``data_id`` identifies the data
    (e.g. its sha256) for that check. ``on_epoch_end(epoch, row)`` is called after the
    checkpoint with the epoch's history row: epoch, train_loss, lr, val_psnr_x<s>...,
    patches_per_s, time_s. Raises ``FloatingPointError`` naming epoch and step on a non-finite loss.

    Under a process group (:func:`process_group`) each process trains on its slice of every batch
    (``batch_size`` must be a multiple of the number of processes) on ``device``, its own; all
    return the same result, and only rank 0 touches the checkpoint, calls ``on_epoch_end`` and
    shows progress (see the module docstring).
    """
    if train_lr.shape != train_hr.shape or train_lr.ndim != 4 or train_lr.shape[1] != 1:
        raise ValueError(f"patches must be (N, 1, P, P) alike, got lr {train_lr.shape} and hr {train_hr.shape}")
    if train_lr.shape[2] != train_lr.shape[3]:
        raise ValueError(f"patches must be square for the rotations, got {train_lr.shape[2:]}")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = resolve_device(device)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    n = train_lr.shape[0]
    batch_size = min(config.batch_size, n)  # global: all processes together
    if batch_size % world_size:
        raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} processes")
    local_batch = batch_size // world_size
    mine = slice(rank * local_batch, (rank + 1) * local_batch)  # this process's columns of each batch
    steps = config.steps_per_epoch or n // batch_size
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if world_size > 1:
        check_same_data(data_id, world_size)

    with runtime_switches(device) as autocast:
        # model and optimizer, from scratch or from the checkpoint (read by rank 0, sent to all)
        torch.manual_seed(config.seed)
        model = build_model(model_config).to(device, memory_format=memory_format)
        optimizer = make_optimizer(model, config, device)
        payload = None
        if rank == 0 and checkpoint_path is not None:
            payload = checkpoint_to_resume(checkpoint_path, model_config, config, data_id)
        if world_size > 1:
            shared = [payload]
            dist.broadcast_object_list(shared, src=0, device=device if device.type == "cuda" else None)
            payload = shared[0]
        history: list[dict[str, float]] = []
        if payload is not None:
            model.load_state_dict(payload["model"])
            kernels = {key: optimizer.param_groups[0].get(key) for key in ("fused", "foreach")}
            for group in payload["optimizer"]["param_groups"]:
                group.update(kernels)  # this device's kernels, wherever the checkpoint was made
            optimizer.load_state_dict(payload["optimizer"])
            set_rng_states(payload["rng"])
            history = list(payload["history"])
            log.info("resuming from %s after epoch %d", checkpoint_path, payload["epoch"])
        resumed_from = len(history)
        step_model = torch.compile(model) if compile else model
        if world_size > 1:  # averages the gradients over the processes during backward
            step_model = DistributedDataParallel(step_model, device_ids=[device] if device.type == "cuda" else None)
        lr_patches, hr_patches = place_patches(train_lr, train_hr, device)
        log.info("training %s on %d patches (%d steps of %d per epoch%s) on %s, epochs %d..%d",
                 model_config, n, steps, batch_size,
                 f", {local_batch} in each of {world_size} processes" if world_size > 1 else "",
                 device, resumed_from + 1, config.epochs)

        model.train()
        for epoch in range(resumed_from + 1, config.epochs + 1):
            # the epoch's learning rate and random draws, from (seed, epoch) alone: the same in every process
            lr = step_decay_lr(epoch, config.lr, config.lr_step_epochs, config.lr_gamma)
            for group in optimizer.param_groups:
                group["lr"] = lr
            generator = epoch_generator(config.seed, epoch)
            order = batch_order(n, steps, batch_size, generator)  # (steps, B)
            transforms = torch.randint(0, 8, (steps, batch_size), generator=generator)  # (steps, B)
            order = order[:, mine].to(lr_patches.device)  # (steps, B / processes)
            transforms = transforms[:, mine].to(device)

            loss_sum = torch.zeros((), device=device)
            first_bad_step = torch.full((), steps, device=device)  # steps: none yet
            start = time.perf_counter()
            bar = tqdm(range(steps), desc=f"epoch {epoch}/{config.epochs}", unit="step",
                       disable=not progress or rank != 0)
            for step in bar:
                x, y = get_batch(lr_patches, hr_patches, order[step], device)
                if config.augment:
                    x, y = augment(x, y, transforms[step])
                x = x.contiguous(memory_format=memory_format)
                loss = train_step(step_model, optimizer, x, y, lr=lr, clip=config.clip,
                                  clip_theta=config.clip_theta, autocast=autocast)
                loss_sum += loss
                first_bad_step = torch.where((first_bad_step == steps) & ~torch.isfinite(loss), step, first_bad_step)
                # Reading a GPU scalar waits for all queued work, so it is done only every
                # LOG_EVERY steps; in between the CPU runs ahead and queues the next steps.
                if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
                    if world_size > 1:  # all processes stop together, at the first bad step of any
                        dist.all_reduce(first_bad_step, op=dist.ReduceOp.MIN)
                    bad = int(first_bad_step.item())
                    if bad < steps:
                        raise FloatingPointError(
                            f"epoch {epoch}, step {bad + 1}/{steps}: the loss is not finite (nan or inf) at "
                            f"lr {lr:g}; lower train.lr or clip the gradients (train.clip)"
                        )
                    rate = (step + 1) * batch_size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{loss.item():.4g}", lr=f"{lr:.3g}", patches_s=f"{rate:.0f}")
            bar.close()
            if world_size > 1:  # the mean of the slices' losses is the batch loss
                dist.all_reduce(loss_sum)
            train_loss = loss_sum.item() / steps / world_size  # waits for the GPU
            train_time = time.perf_counter() - start

            val = validate(model, validation, device)
            row = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
            row.update({f"val_psnr_x{scale}": value for scale, value in val.items()})
            row.update(patches_per_s=steps * batch_size / train_time, time_s=time.perf_counter() - start)
            history.append(row)
            log.info("epoch %d: loss %.5f, lr %.3g, val psnr %s, %.0f patches/s", epoch, train_loss, lr,
                     " ".join(f"x{s} {v:.2f}" for s, v in val.items()) or "-", row["patches_per_s"])

            if rank == 0 and checkpoint_path is not None:
                save_checkpoint(checkpoint_path, model=model, optimizer=optimizer, model_config=model_config,
                                config=config, data_id=data_id, epoch=epoch, history=history)
            if rank == 0 and on_epoch_end is not None:
                on_epoch_end(epoch, dict(row))

    model.eval()
    return TrainResult(model=model, history=history, resumed_from=resumed_from)

"""Several processes (torchrun): this process's place, its device and the process group.

One process per GPU (NCCL), or several on the CPU (gloo). See the module docstring of
:mod:`vdsr.train` for how a global batch is split over the processes.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vdsr.models import resolve_device

# Long enough for rank 0's final writes (model file, MLflow model logging) while the others wait
# at the closing barrier; the default (10 min on NCCL) could end a slow but healthy job.
GROUP_TIMEOUT = datetime.timedelta(minutes=60)
TORCHRUN_ENV = "VDSR_TORCHRUN"  # torchrun options: a stage relaunches itself under torchrun with them


@dataclass(frozen=True)
class World:
    """This process's place among torchrun's processes."""

    rank: int = 0  # 0 .. size - 1 over all nodes; rank 0 writes the outputs
    local_rank: int = 0  # on this node: the GPU it uses
    size: int = 1  # processes in all


def relaunch_under_torchrun_if_asked(environ: Mapping[str, str], argv: list[str]) -> None:
    """With :data:`TORCHRUN_ENV` set and no torchrun around this process yet, replace it by
    ``python -m torch.distributed.run <options> <argv>`` (same interpreter and environment)."""
    options = environ.get(TORCHRUN_ENV, "").strip()
    if not options or "WORLD_SIZE" in environ:
        return
    command = [sys.executable, "-m", "torch.distributed.run", *shlex.split(options), *argv]
    print(f"train: {TORCHRUN_ENV} is set, relaunching: {shlex.join(command)}", file=sys.stderr, flush=True)
    os.execv(sys.executable, command)


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
    return torch.device("cuda", gpu_index(world.local_rank, torch.cuda.device_count()))


def gpu_index(local_rank: int, visible: int) -> int:
    """The GPU of local process ``local_rank`` when ``visible`` GPUs are visible to it.

    One GPU per process: either the process sees all of the node's GPUs and takes number
    LOCAL_RANK, or the launcher gave it exactly one (``CUDA_VISIBLE_DEVICES`` per process,
    as Slurm and some Kubernetes launchers do), which is then ``cuda:0`` whatever its rank.
    """
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise ValueError(f"local rank {local_rank} has no GPU: this node has {visible}; "
                         "start at most that many processes per node")
    return local_rank


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join torchrun's process group for the block: NCCL on CUDA, gloo on the CPU; nothing for one process.

    On a normal exit every process waits at a barrier for the others -- rank 0 for one writes the
    outputs after training -- so the job ends only when they are complete; the group's timeout
    (:data:`GROUP_TIMEOUT`) is long enough for those writes. On an error a process
    leaves at once, and torchrun stops the others.
    """
    if world.size == 1:
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=GROUP_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=GROUP_TIMEOUT)
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



"""Stage ``train@<name>``: params ``train.<name>`` + data/prepared/{train,val}.h5 -> models/<name>.pt
and the training record (metrics/train_<name>.json, plots/train_<name>.csv,
checkpoints/<name>/last.pt, an MLflow run whose id goes to models/<name>.mlflow_run.json). Run from
the repository root: ``python stages/train.py <name>``; ``dvc.yaml`` runs one such stage for each
section of ``train`` in params.yaml (``train: {vdsr: {..}, srcnn: {..}}``), each validated by
:class:`vdsr.recipe.TrainParams`, the one schema of a model section.

Resuming: the stage continues checkpoints/<name>/last.pt when it was made with the same recipe and
the same prepared data (the sha256 of train.h5 and val.h5, whatever DVC thinks of them). One that
cannot be resumed stops the stage, with the reasons, before an MLflow run or any step;
``VDSR_START_OVER=1`` (``VDSR_START_OVER=1 dvc repro``) moves it aside to a dated name instead,
``checkpoints/<name>.aside/last.<YYYYmmdd-HHMM>.pt``, and trains from scratch. It never deletes one.
The folder is beside ``checkpoints/<name>`` (:func:`vdsr.checkpoints.aside_dir_of`): DVC's record
of that output stays the training's own.

Time and interrupts: after the first steps the stage says how long the whole run will take at
the measured speed (and warns when that is days on a CPU). Ctrl-C or SIGTERM stops after the
current step with a checkpoint and one line saying how to resume; a checkpoint is also written
every ``train.checkpoint_minutes`` of training, so the same command continues where it stopped.

Several GPUs or nodes: ``torchrun --standalone --nproc-per-node=8 stages/train.py``, or, to keep
DVC's command line, ``VDSR_TORCHRUN="--standalone --nproc-per-node=8" dvc repro``: the stage
then relaunches itself under torchrun with those options. Every process trains its share of each
batch; rank 0 alone logs to MLflow and writes the outputs (README, "Multi-GPU and multi-node").
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from paths import ModelPaths

from vdsr.checkpoints import START_OVER, CheckpointError, aside_dir_of, checkpoint_to_resume, start_over_requested
from vdsr.config import ParamsError, load_params, require
from vdsr.distributed import World, process_device, process_group, relaunch_under_torchrun_if_asked, torchrun_world
from vdsr.io import error_message, sha256_file
from vdsr.models import ModelFileError, build_model, count_parameters, receptive_field
from vdsr.prepare import load_patches, load_validation, patch_size_of
from vdsr.recipe import TrainParams, load_model_section
from vdsr.runtime import Runtime, keep_freed_memory, resolve_runtime
from vdsr.train import StopRequest, TrainingInterrupted, TrainResult, train
from vdsr.train_record import train_and_record

log = logging.getLogger("stages.train")

PARAMS_FILE = Path("params.yaml")
TRAIN_FILE = Path("data/prepared/train.h5")
VAL_FILE = Path("data/prepared/val.h5")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not re.fullmatch(r"[A-Za-z0-9_-]+", argv[0]):
        print(f"train: error: usage: python stages/train.py <name of a train section>, got {argv}", file=sys.stderr)
        return 2
    relaunch_under_torchrun_if_asked(os.environ, sys.argv)
    keep_freed_memory()  # validation's whole-image passes without page faults (vdsr.runtime)
    world = torchrun_world(os.environ)
    # Rank 0 speaks for all; the other processes report only warnings and errors.
    prefix = f"rank {world.rank}: " if world.rank else ""
    logging.basicConfig(level=logging.INFO if world.rank == 0 else logging.WARNING, format=f"{prefix}%(message)s")
    stop = StopRequest()
    stop.install()
    try:
        train_stage(argv[0], world, stop)
    except (ParamsError, CheckpointError, ModelFileError, ValueError, OSError) as error:
        print(f"train: {prefix}error: {error_message(error)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as stopped:
        signame = signal.Signals(stop.signum).name if stop.signum else "a stop request"
        where = (f"checkpoint {stopped.checkpoint_path} holds it; run the same command again (dvc repro) to resume"
                 if stopped.checkpoint_path else "no checkpoint")
        print(f"train: {prefix}stopped by {signame} after {stopped.position}; {where}", file=sys.stderr)
        return 128 + (stop.signum or signal.SIGINT)
    except KeyboardInterrupt:
        print(f"train: {prefix}stopped at once by a second signal; the last checkpoint (if any) is kept",
              file=sys.stderr)
        return 128 + signal.SIGINT
    return 0


def train_stage(name: str, world: World, stop: Callable[[], bool] | None = None) -> None:
    p = load_model_section(name, PARAMS_FILE)
    p.check_processes(f"{PARAMS_FILE}: train.{name}", world.size)
    device = process_device(p.device, world)
    if p.device == "auto" and device.type == "cpu":
        log.info("device auto: no CUDA GPU found, training on the CPU")
    runtime = resolve_runtime(device, p.precision, p.channels_last, p.compile)
    with process_group(world, device):
        train_and_write(name, p, world, runtime, stop)


def train_and_write(name: str, p: TrainParams, world: World, runtime: Runtime,
                    stop: Callable[[], bool] | None = None) -> None:
    """Check the recipe against the data, train (every process its share) and, on rank 0, log the
    run to MLflow and write the stage's outputs (:func:`vdsr.train_record.train_and_record`)."""
    out = ModelPaths(name)
    start_over = start_over_requested(os.environ)
    if p.model == "srcnn":
        log.info("model srcnn: train.depth (%d) is not used, SRCNN has 3 layers (9-5-5)", p.depth)
    model_config, config = p.model_config(), p.train_config()
    patch_size, field = patch_size_of(TRAIN_FILE), receptive_field(model_config)  # before the patches are loaded
    require(field <= patch_size, f"train.{name}.depth",
            f"a model whose receptive field ({field} px) fits the {patch_size} px patches of {TRAIN_FILE} "
            f"(prepare.patch_size; VDSR's is 2 x depth + 1)", p.depth)
    train_sha256, val_sha256 = sha256_file(TRAIN_FILE), sha256_file(VAL_FILE)
    data_id = f"{train_sha256}+{val_sha256}"  # the content, not DVC's view of it (size, mtime)
    if world.rank == 0:  # train() checks again; here it stops before loading the patches or opening a run
        checkpoint_to_resume(out.checkpoint, model_config, config, data_id, start_over=start_over, way_out=START_OVER,
                             data_name=f"sha256 of {TRAIN_FILE} + {VAL_FILE.name}", aside_dir=aside_dir_of(out.checkpoint))
    patches = load_patches(TRAIN_FILE)
    validation = load_validation(VAL_FILE)
    log.info("loaded %d patches of %dx%d from %s (scales %s), validation %s from %s",
             len(patches.lr), *patches.lr.shape[2:], TRAIN_FILE, sorted(set(patches.scale.tolist())),
             {f"x{s}": len(images) for s, images in validation.items()}, VAL_FILE)
    log.info("%s: %d parameters, receptive field %d px", model_config, count_parameters(build_model(model_config)), field)

    def fit(**callbacks: Any) -> TrainResult:
        return train(patches.lr, patches.hr, validation, model_config, config, runtime=runtime,
                     checkpoint_path=out.checkpoint, checkpoint_every_s=p.checkpoint_minutes * 60 or None,
                     data_id=data_id, stop=stop, **callbacks)

    if world.rank != 0:  # the other processes train their share of each batch and write nothing
        fit()
        return
    train_and_record(fit, out, name=name, recipe=p, model_config=model_config, runtime=runtime, processes=world.size,
                     data_sha256=(train_sha256, val_sha256), params=load_params(PARAMS_FILE),
                     input_example=patches.lr[:2])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

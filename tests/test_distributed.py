"""The train stage under torchrun: two processes on the CPU (gloo) train the model that one
process trains with the same global batch, resume from a checkpoint, and only rank 0 writes.

Tolerance. Not bit-identical: one process adds up the batch's gradient in one sum, two
processes add up half-batches and DDP averages the halves, so float32 rounding differs
(~1e-7 relative per step) and momentum carries it on. Measured here (VDSR 3 x 8, 2 epochs of 10
steps, SGD without clipping, one thread per process): weights differ by at most 1.5e-7 (of
weights up to 0.56), validation PSNR by 1.4e-5 dB, the training loss by 1.5e-6 relative; the
bounds below leave a margin of 60x or more. A gradient summed instead of averaged over the two
processes moves the weights by 0.03. No clipping, on purpose: adjustable clipping clamps most
gradient elements to the same bound either way, and would hide such a scaling error.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vdsr.prepare import write_training_set, write_validation_set

from conftest import run_child

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE = REPO_ROOT / "stages" / "train.py"
# `torchrun --standalone --nproc-per-node=2`, with this Python
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
TRAIN = {"depth": 3, "width": 8, "optimizer": "sgd", "lr": 3.0e-5, "clip": "none", "epochs": 2, "batch_size": 8,
         "steps_per_epoch": 10, "seed": 0, "device": "cpu",
         "precision": "fp32", "channels_last": False}  # fp32: one vs two processes differ by float rounding only
WEIGHTS_ATOL = 1e-5
PSNR_ATOL_DB = 1e-3
LOSS_RTOL = 1e-4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, set5_dir):
    folder = tmp_path_factory.mktemp("prepared")
    images = sorted(set5_dir.iterdir())
    write_training_set(images, folder / "train.h5", scales=[2, 3], downsizing=[1.0], patch_size=41, stride=41)
    write_validation_set(images, folder / "val.h5", scales=[2])
    return folder


def stage_dir(folder: Path, prepared: Path, **train) -> Path:
    """A working directory for the stage: the prepared data and a params.yaml with only `train`."""
    (folder / "data" / "prepared").mkdir(parents=True)
    for name in ("train.h5", "val.h5"):
        (folder / "data" / "prepared" / name).symlink_to(prepared / name)
    section = {**yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["vdsr"], **TRAIN, **train}
    (folder / "params.yaml").write_text(yaml.safe_dump({"train": {"vdsr": section}}))
    return folder


def run_stage(folder: Path, command: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items()
           if name not in ("DVC_ROOT", "VDSR_TORCHRUN", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
               OMP_NUM_THREADS="1",  # as torchrun sets it for each of several processes
               GLOO_SOCKET_IFNAME="lo",  # gloo talks over the loopback interface only
               **extra_env)
    return run_child(command, cwd=folder, env=env, timeout=600)


def history(folder: Path) -> list[dict[str, float]]:
    with open(folder / "plots" / "train_vdsr.csv") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "models" / "vdsr.pt", map_location="cpu", weights_only=True)["state_dict"]


def mlflow_runs(folder: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("vdsr").experiment_id], order_by=["start_time ASC"])


def test_two_processes_train_the_model_of_one_and_resume(prepared, tmp_path):
    one = stage_dir(tmp_path / "one", prepared)
    done = run_stage(one, [sys.executable, str(STAGE), "vdsr"])
    assert done.returncode == 0, done.stderr[-3000:]

    # Two processes, first one epoch, then extended to two: the second run resumes from the
    # checkpoint that rank 0 wrote and sent to rank 1.
    two = stage_dir(tmp_path / "two", prepared, epochs=1)
    first = run_stage(two, [*TORCHRUN, str(STAGE), "vdsr"])
    assert first.returncode == 0, first.stderr[-3000:]
    (two / "params.yaml").write_text((two / "params.yaml").read_text().replace("epochs: 1", "epochs: 2"))
    second = run_stage(two, [*TORCHRUN, str(STAGE), "vdsr"])
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "resuming from checkpoints/vdsr/last.pt after epoch 1" in output
    assert "(10 steps of 8 per epoch, 4 in each of 2 processes) on cpu fp32 NCHW, epochs 2..2" in output

    # Same model and metrics as one process, to within float rounding (module docstring).
    single, double = weights(one), weights(two)
    assert single.keys() == double.keys()
    diffs = {name: (single[name] - double[name]).abs().max().item() for name in single}
    print(f"one vs two processes: weights differ by {max(diffs.values()):.2g} at most")
    assert max(diffs.values()) < WEIGHTS_ATOL, diffs
    rows_one, rows_two = history(one), history(two)
    assert [row["epoch"] for row in rows_two] == [1.0, 2.0]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOSS_RTOL)
        assert b["val_psnr_x2"] == pytest.approx(a["val_psnr_x2"], abs=PSNR_ATOL_DB)
        assert b["lr"] == a["lr"]
    metrics = json.loads((two / "metrics" / "train_vdsr.json").read_text())
    assert metrics["epochs"] == 2 and metrics["val_psnr_x2"] == pytest.approx(rows_one[-1]["val_psnr_x2"], abs=1e-3)

    # Rank 0 alone reports and writes: one line per epoch, one MLflow run per invocation, one checkpoint.
    assert output.count("epoch 2: loss") == 1 and "rank 1:" not in output
    assert first.stdout.count("epoch 1: loss") + first.stderr.count("epoch 1: loss") == 1
    runs = mlflow_runs(two)
    assert [run.info.status for run in runs] == ["FINISHED", "FINISHED"]
    assert [run.data.tags.get("processes") for run in runs] == ["2", "2"]
    assert runs[1].data.tags["resumed_from_epoch"] == "1"
    assert json.loads((two / "models" / "vdsr.mlflow_run.json").read_text())["run_id"] == runs[1].info.run_id
    assert [p.name for p in (two / "checkpoints" / "vdsr").iterdir()] == ["last.pt"]


def test_launcher_variable_and_a_batch_that_does_not_split(prepared, tmp_path):
    # VDSR_TORCHRUN relaunches `python stages/train.py` (DVC's command) under torchrun; each
    # process then refuses a global batch that two processes cannot share equally.
    folder = stage_dir(tmp_path / "odd", prepared, batch_size=7)
    done = run_stage(folder, [sys.executable, str(STAGE), "vdsr"], VDSR_TORCHRUN="--standalone --nproc-per-node=2")
    assert done.returncode != 0
    assert "VDSR_TORCHRUN is set, relaunching:" in done.stderr and "torch.distributed.run" in done.stderr
    assert ("train: error: params.yaml: train.vdsr.batch_size: expected a multiple of the number of processes (2)"
            in done.stderr), done.stderr[-3000:]
    assert not (folder / "checkpoints").exists() and not (folder / "mlflow.db").exists()

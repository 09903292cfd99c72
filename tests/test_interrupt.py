"""Ctrl-C and SIGTERM in the middle of an epoch of `python stages/train.py`: one line (no
traceback) saying where it stopped and how to resume, a checkpoint at that step, the MLflow run
ended KILLED; the same command then resumes and ends with exactly the weights of an
uninterrupted run, its MLflow run naming the run it continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_child
from vdsr.prepare import write_training_set, write_validation_set

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN = {
    "model": "vdsr", "depth": 3, "width": 8, "optimizer": "adam", "lr": 1.0e-3, "momentum": 0.9,
    "weight_decay": 0.0, "lr_schedule": "cosine", "lr_step_epochs": 20, "lr_gamma": 0.1, "min_lr": 0.0,
    "warmup_steps": 10, "epochs": 2, "batch_size": 8, "loss": "l1", "clip": "norm", "clip_theta": 1.0,
    "augment": True, "steps_per_epoch": 120, "seed": 5, "device": "cpu", "precision": "bf16",
    "channels_last": True, "compile": "none", "checkpoint_minutes": 0.001,  # every step: a signal lands mid-epoch
}
# One thread: CPU results are bit-identical for a given thread count only.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, set5_dir) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    images = sorted(set5_dir.iterdir())
    write_training_set(images, folder / "train.h5", scales=[2], downsizing=[1.0], patch_size=41, stride=41)
    write_validation_set(images[:2], folder / "val.h5", scales=[2])
    return folder


def workspace(root: Path, prepared: Path) -> tuple[Path, dict[str, str]]:
    (root / "data" / "prepared").mkdir(parents=True)
    for name in ("train.h5", "val.h5"):
        (root / "data" / "prepared" / name).symlink_to(prepared / name)
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {"vdsr": TRAIN}}))
    env = {**os.environ, **ENV, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env.pop("DVC_ROOT", None)
    return root, env


def run_stage(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_child([sys.executable, str(REPO_ROOT / "stages" / "train.py"), "vdsr"], cwd=root, env=env, timeout=600)


def interrupt_stage(root: Path, env: dict[str, str], signum: int, timeout_s: float = 300) -> tuple[int, str]:
    """Start the stage, send ``signum`` once its first mid-epoch checkpoint exists; (exit code, stderr)."""
    checkpoint = root / "checkpoints" / "vdsr" / "last.pt"
    log = root / "stage.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "stages" / "train.py"), "vdsr"], cwd=root, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not checkpoint.exists():
            assert proc.poll() is None, f"the stage ended ({proc.returncode}) before any checkpoint:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint in {timeout_s} s:\n{log.read_text()}"
            time.sleep(0.02)
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: the child prints its stack, then dies
            proc.wait(timeout=30)
    return code, log.read_text()


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory) -> Path:
    """The same training run to its end without a signal."""
    root, env = workspace(tmp_path_factory.mktemp("fresh"), prepared)
    done = run_stage(root, env)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def weights(root: Path) -> dict[str, torch.Tensor]:
    return torch.load(root / "models" / "vdsr.pt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_with_one_line_and_the_same_command_resumes_exactly(prepared, uninterrupted, tmp_path, signum):
    root, env = workspace(tmp_path / "stopped", prepared)
    code, output = interrupt_stage(root, env, signum)
    name = signal.Signals(signum).name
    assert code == 128 + signum, output
    assert "Traceback" not in output, output
    stopped = [line for line in output.splitlines() if line.startswith("train: stopped by")]
    assert len(stopped) == 1, output
    assert stopped[0].startswith(f"train: stopped by {name} after epoch 0 and ")  # mid-epoch 1
    assert stopped[0].endswith("checkpoint checkpoints/vdsr/last.pt holds it; run the same command again "
                               "(dvc repro) to resume")
    step = torch.load(root / "checkpoints" / "vdsr" / "last.pt", map_location="cpu", weights_only=True)["step"]
    assert 0 < step < TRAIN["steps_per_epoch"] and f"and {step} steps of epoch 1;" in stopped[0]
    assert not (root / "models" / "vdsr.pt").exists()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (first,) = client.search_runs([client.get_experiment_by_name("vdsr").experiment_id])
    assert first.info.status == "KILLED"
    assert first.data.tags["stopped_after"] == f"epoch 0 and {step} steps of epoch 1"
    assert first.data.tags["runtime.precision"] == "bf16" and first.data.tags["device"].startswith("cpu (")

    resumed = run_stage(root, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoints/vdsr/last.pt after epoch 0 and {step} steps of epoch 1" in resumed.stderr
    run_id = json.loads((root / "models" / "vdsr.mlflow_run.json").read_text())["run_id"]
    second = client.get_run(run_id)
    assert second.info.status == "FINISHED" and second.data.tags["continues_run"] == first.info.run_id

    fresh = uninterrupted
    a, b = weights(root), weights(fresh)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert (root / "plots" / "train_vdsr.csv").read_text() == (fresh / "plots" / "train_vdsr.csv").read_text()

"""`kill -9` in the middle of an epoch of `dvc repro train`, then `dvc repro train` again: the stage
resumes from checkpoints/vdsr/last.pt at the step it holds and ends exactly where an uninterrupted
run ends (CPU, fixed seeds).

What makes this work, and what this test pins down:
- `checkpoints` is a `persist: true` output, so DVC does not delete it before re-running the stage;
- the checkpoint is replaced atomically after every epoch and every `train.checkpoint_minutes`
  (here: every step), so a kill leaves the last whole one, mid-epoch;
- DVC's repository lock is an fcntl lock, which the kernel releases when its holder dies, and its
  per-output lock (.dvc/tmp/rwlock) records the holder's pid: DVC 3.x sees that the pid is gone,
  warns "... had been killed. Auto removed it from the lock file." and goes on. Nothing needs to
  be deleted by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_checked

EPOCHS = 6
PARAMS = {
    "download": {"sets": ["Set5", "Set14"]},
    "prepare": {"train_sets": ["Set14"], "val_set": "Set5", "scales": [2], "downsizing": [1.0], "workers": 1},
    # A tiny VDSR and the paper's recipe (SGD, adjustable clipping) as in tests/test_train.py:
    # under a second an epoch (validation included) on one CPU thread.
    "train": {"vdsr": {"depth": 3, "width": 8, "optimizer": "sgd", "lr": 0.1, "clip": "adjustable",
                       "clip_theta": 1.0e-4, "epochs": EPOCHS, "batch_size": 8, "steps_per_epoch": 40, "seed": 7,
                       "device": "cpu", "checkpoint_minutes": 0.0001},  # a checkpoint after every step
              "srcnn": None},  # one model: train@vdsr
}
KILL_AFTER_EPOCH = 2
# One thread in both runs: CPU results are bit-identical for a given thread count only (the
# thread count decides how a batch's gradient sum is split), and two threads on a shared
# two-core machine run ten times slower than one.
THREADS = {"OMP_NUM_THREADS": "1"}


def checkpoint_position(path: Path) -> tuple[int, int]:
    """(epochs done, steps of the next) according to the checkpoint; (0, 0) while there is none."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return 0, 0
    return int(payload["epoch"]), int(payload["step"])


def kill_during_training(repo: Path, env: dict[str, str], log: Path, timeout_s: float = 300) -> tuple[int, int]:
    """Start `dvc repro train` in its own session, SIGKILL the whole session (dvc, the shell, the
    stage) once the checkpoint holds KILL_AFTER_EPOCH epochs and some steps of the next; return
    the position it then holds."""
    checkpoint = repo / "checkpoints" / "vdsr" / "last.pt"
    with open(log, "w") as out:
        proc = subprocess.Popen(["dvc", "repro", "train@vdsr"], cwd=repo, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not (checkpoint_position(checkpoint)[0] >= KILL_AFTER_EPOCH and checkpoint_position(checkpoint)[1] > 0):
            assert proc.poll() is None, f"dvc repro train ended ({proc.returncode}) before the kill:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no checkpoint of epoch {KILL_AFTER_EPOCH} in {timeout_s} s"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the session leader's pid is the process group id
        proc.wait(timeout=30)
    return checkpoint_position(checkpoint)


def weights(repo: Path) -> dict[str, torch.Tensor]:
    return torch.load(repo / "models" / "vdsr.pt", map_location="cpu", weights_only=True)["state_dict"]


def test_kill_9_then_repro_resumes_to_the_uninterrupted_result(pipeline_repo, tmp_path):
    repo, env = pipeline_repo(PARAMS)
    env = {**env, **THREADS}
    run_checked(["dvc", "repro", "prepare"], repo, env)
    fresh = tmp_path / "fresh"  # the same repository, data prepared, for the uninterrupted run
    shutil.copytree(repo, fresh, symlinks=True)

    killed_at, killed_step = kill_during_training(repo, env, tmp_path / "killed.log")
    assert KILL_AFTER_EPOCH <= killed_at < EPOCHS and killed_step > 0, (tmp_path / "killed.log").read_text()
    assert not (repo / "metrics" / "train_vdsr.json").exists()  # the stage did not finish
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "train@vdsr" not in lock["stages"]  # ... and DVC recorded nothing for it

    started = time.perf_counter()
    resumed = run_checked(["dvc", "repro", "train@vdsr"], repo, env)
    resumed_s = time.perf_counter() - started
    output = resumed.stdout + resumed.stderr
    assert "had been killed. Auto removed it from the lock file." in output  # DVC's stale-lock handling
    assert (f"resuming from checkpoints/vdsr/last.pt after epoch {killed_at} and {killed_step} steps of "
            f"epoch {killed_at + 1}") in output
    assert f"epochs {killed_at + 1}..{EPOCHS}" in output  # only the missing epochs are trained
    assert "epoch 1:" not in output

    started = time.perf_counter()
    run_checked(["dvc", "repro", "train@vdsr"], fresh, env)
    uninterrupted_s = time.perf_counter() - started
    print(f"killed after epoch {killed_at} and {killed_step} steps; resumed run {resumed_s:.1f} s, uninterrupted run {uninterrupted_s:.1f} s")

    # Bit for bit: per-epoch history, final metrics (timings aside) and weights.
    assert (repo / "plots" / "train_vdsr.csv").read_text() == (fresh / "plots" / "train_vdsr.csv").read_text()
    metrics = {name: json.loads((r / "metrics" / "train_vdsr.json").read_text()) for name, r in (("a", repo), ("b", fresh))}
    for key in ("train_loss", "val_psnr_x2", "epochs"):
        assert metrics["a"][key] == metrics["b"][key], key
    assert metrics["a"]["epochs"] == EPOCHS
    resumed_weights, fresh_weights = weights(repo), weights(fresh)
    assert resumed_weights.keys() == fresh_weights.keys()
    for name in resumed_weights:
        assert torch.equal(resumed_weights[name], fresh_weights[name]), name
    assert "train@vdsr" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert [p.name for p in (repo / "checkpoints" / "vdsr").iterdir()] == ["last.pt"]

    # MLflow: the killed run stays RUNNING (it had no chance to end); the resumed run holds every
    # epoch's metrics, those of the killed run's epochs logged again from the checkpoint's history.
    from mlflow.tracking import MlflowClient

    run_id = json.loads((repo / "models" / "vdsr.mlflow_run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vdsr").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED", "RUNNING"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_epoch"] == str(killed_at)
    history = client.get_metric_history(run_id, "val_psnr_x2")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    assert max(history, key=lambda m: m.step).value == pytest.approx(metrics["a"]["val_psnr_x2"], abs=1e-4)

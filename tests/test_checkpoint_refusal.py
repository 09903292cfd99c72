"""No checkpoint is trained over: a checkpoint that cannot be resumed stops the train stage (one
process or two) and `make release-cpu-continue`, byte for byte kept; `VDSR_START_OVER=1` moves it
aside to a dated name. The data check is on the content (sha256 of train.h5 and val.h5): a
one-byte change with the file's mtime kept, which DVC does not see, is refused too."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import h5py
import pytest
import yaml

from conftest import REPO_ROOT, run_checked, run_child
from vdsr.prepare import write_training_set, write_validation_set

pytest_plugins = ["mlflow_server"]  # the tiny_repo fixture

STAGE = REPO_ROOT / "stages" / "train.py"
TRAIN = {"depth": 3, "width": 8, "optimizer": "adam", "lr": 1.0e-3, "clip": "norm", "clip_theta": 1.0, "epochs": 1,
         "batch_size": 8, "steps_per_epoch": 4, "seed": 0, "device": "cpu", "precision": "fp32",
         "channels_last": False}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, set5_dir):
    folder = tmp_path_factory.mktemp("prepared")
    images = sorted(set5_dir.iterdir())
    write_training_set(images, folder / "train.h5", scales=[2], downsizing=[1.0], patch_size=41, stride=41)
    write_validation_set(images, folder / "val.h5", scales=[2])
    return folder


def stage_dir(folder: Path, prepared: Path) -> Path:
    """A working directory for the stage: copies of the prepared data, params.yaml with only `train`."""
    (folder / "data").mkdir(parents=True)
    shutil.copytree(prepared, folder / "data" / "prepared")
    section = {**yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["vdsr"], **TRAIN}
    (folder / "params.yaml").write_text(yaml.safe_dump({"train": {"vdsr": section}}))
    return folder


def run_stage(folder: Path, command: list[str], **extra_env: str):
    env = {name: value for name, value in os.environ.items()
           if name not in ("DVC_ROOT", "VDSR_TORCHRUN", "VDSR_START_OVER", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               **extra_env)
    return run_child(command, cwd=folder, env=env, timeout=600)


def change_one_byte_keep_mtime(path: Path) -> None:
    """Flip the lowest bit of the first HR patch byte (the file stays a readable patch file) and
    put size and mtime back as they were: DVC's file state says unchanged."""
    with h5py.File(path, "r") as h5:
        offset = h5["hr"].id.get_chunk_info(0).byte_offset
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 1]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


def mlflow_run_count(folder: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    return len(client.search_runs([client.get_experiment_by_name("vdsr").experiment_id]))


def test_stage_refuses_other_data_with_the_same_mtime_and_starts_over_on_request(prepared, tmp_path):
    folder = stage_dir(tmp_path, prepared)
    command = [sys.executable, str(STAGE), "vdsr"]
    first = run_stage(folder, command)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = folder / "checkpoints" / "vdsr" / "last.pt"
    saved = checkpoint.read_bytes()

    change_one_byte_keep_mtime(folder / "data" / "prepared" / "train.h5")
    refused = run_stage(folder, command)
    assert refused.returncode == 1, refused.stderr[-3000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("train: error: checkpoints/vdsr/last.pt: cannot resume from this checkpoint: "
                            "the training data differs (sha256 of data/prepared/train.h5 + val.h5 was "), error
    assert "VDSR_START_OVER=1 dvc repro" in error
    assert "moves it aside to checkpoints/vdsr.aside/last.<date>-<time>.pt" in error
    assert "Traceback" not in refused.stderr
    assert checkpoint.read_bytes() == saved and sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.pt"]
    assert not (folder / "checkpoints" / "vdsr.aside").exists()
    assert mlflow_run_count(folder) == 1  # refused before an MLflow run was opened

    typo = run_stage(folder, command, VDSR_START_OVER="yes")
    assert typo.returncode == 1 and "train: error: VDSR_START_OVER: expected 1 (move a checkpoint" in typo.stderr
    assert checkpoint.read_bytes() == saved

    over = run_stage(folder, command, VDSR_START_OVER="1")
    assert over.returncode == 0, over.stderr[-3000:]
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.pt"]  # DVC's output: the new training's
    aside = list((folder / "checkpoints" / "vdsr.aside").iterdir())
    assert len(aside) == 1 and aside[0].read_bytes() == saved, aside
    assert aside[0].name.startswith("last.2") and aside[0].suffix == ".pt"
    assert f"moved it aside to {aside[0].relative_to(folder)}, training from scratch" in over.stderr
    assert "resuming from" not in over.stderr and checkpoint.read_bytes() != saved


def test_two_processes_both_stop_at_a_checkpoint_of_other_settings(prepared, tmp_path):
    """Under torchrun rank 0 reads the checkpoint; its refusal reaches rank 1 too (no hang)."""
    script = tmp_path / "refused.py"
    script.write_text(f'''
import os, sys
import torch
sys.path.insert(0, {str(REPO_ROOT)!r})
from vdsr.checkpoints import CheckpointError
from vdsr.distributed import process_group, torchrun_world
from vdsr.models import ModelConfig
from vdsr.prepare import load_patches, load_validation
from vdsr.train import TrainConfig, train

world = torchrun_world(os.environ)
patches, validation = load_patches({str(prepared / "train.h5")!r}), load_validation({str(prepared / "val.h5")!r})
config = TrainConfig(lr=float(sys.argv[1]), epochs=1, batch_size=8, steps_per_epoch=2)
with process_group(world, torch.device("cpu")):
    try:
        train(patches.lr, patches.hr, {{2: validation[2][:1]}}, ModelConfig("vdsr", 3, 8), config, device="cpu",
              checkpoint_path={str(tmp_path / "last.pt")!r}, data_id="d", progress=False)
    except CheckpointError as error:
        print(f"rank {{world.rank}}: refused: {{error}}", flush=True)
        sys.exit(3)
print(f"rank {{world.rank}}: trained", flush=True)
''')
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    first = run_stage(tmp_path, [*torchrun, "0.1"])
    assert first.returncode == 0 and first.stdout.count("trained") == 2, first.stderr[-3000:]
    saved = (tmp_path / "last.pt").read_bytes()
    second = run_stage(tmp_path, [*torchrun, "0.05"])
    assert second.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank}: refused: " in second.stdout, second.stdout + second.stderr[-3000:]
    assert "train.lr was 0.1, now 0.05" in second.stdout
    assert (tmp_path / "last.pt").read_bytes() == saved


def test_release_cpu_continue_never_trains_from_scratch_over_a_checkpoint(tiny_repo):
    """`make release-cpu-continue` with a checkpoint of other settings: the train stage stops at
    once (also with VDSR_START_OVER=1 in the caller's environment), the checkpoint is kept as it
    was, and the Makefile says what to do."""
    repo, env = tiny_repo()
    run_checked(["dvc", "repro", "train@vdsr"], repo, env)  # the tiny recipe's finished checkpoint
    checkpoint = repo / "checkpoints" / "vdsr" / "last.pt"
    saved = checkpoint.read_bytes()
    # The release recipe would take hours on the tiny model: a refusal comes in well under the bound.
    done = run_child(["make", "release-cpu-continue"], cwd=repo, env={**env, "VDSR_START_OVER": "1"}, timeout=420)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "checkpoints/vdsr/last.pt: cannot resume from this checkpoint: " in output, output[-3000:]
    assert "train.lr_schedule was 'step', now 'cosine'" in output
    assert "release-cpu-continue: stopped. If the train stage refused" in output
    assert checkpoint.read_bytes() == saved and sorted(p.name for p in checkpoint.parent.iterdir()) == ["last.pt"]
    assert sorted(p.name for p in checkpoint.parent.parent.iterdir()) == ["vdsr"]  # nothing set aside

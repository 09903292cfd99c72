"""The real ``dvc repro`` of the data stages in a temporary git repository, from the local mirror."""

from __future__ import annotations

import json

import h5py
import pytest
from conftest import run_checked

SMALL = {
    "download": {"sets": ["Set5", "Set14"], "workers": 4},
    "prepare": {"train_sets": ["Set14"], "val_set": "Set5", "scales": [2, 4], "downsizing": [1.0], "workers": 1},
    "baseline": {"sets": ["Set5", "Set14"], "scales": [2, 3, 4]},
}


def test_dvc_repro_data_stages_then_nothing_to_do(pipeline_repo) -> None:
    repo, env = pipeline_repo(SMALL)
    first = run_checked(["dvc", "repro", "prepare", "baseline"], repo, env)
    for stage in ("download", "prepare", "baseline"):
        assert f"Running stage '{stage}'" in first.stdout

    assert sorted(p.name for p in (repo / "data/raw/Set5").iterdir()) == [
        "baby.png", "bird.png", "butterfly.png", "head.png", "woman.png"]
    with h5py.File(repo / "data/prepared/train.h5") as h5:
        assert h5["lr"].shape[0] == h5["hr"].shape[0] > 100
        assert set(h5["scale"][...].tolist()) == {2, 4}
    bicubic = json.loads((repo / "metrics/bicubic.json").read_text())
    assert bicubic["Set5"]["x2"] == {"psnr": pytest.approx(33.66, abs=0.01), "ssim": pytest.approx(0.9299, abs=2e-4)}
    assert set(bicubic) == {"Set5", "Set14"} and set(bicubic["Set14"]) == {"x2", "x3", "x4"}

    second = run_checked(["dvc", "repro", "prepare", "baseline"], repo, env)
    assert "Running stage" not in second.stdout
    # bicubic.json is a plain output, not a metric: the same in every experiment (dvc.yaml, the baseline stage's comment)
    assert "up to date" in run_checked(["dvc", "status", "prepare", "baseline"], repo, env).stdout

    # A params change re-runs only the stage that reads it.
    exp = run_checked(["dvc", "exp", "run", "-S", "baseline.scales=[2]", "prepare", "baseline"], repo, env)
    assert set(json.loads((repo / "metrics/bicubic.json").read_text())["Set5"]) == {"x2"}
    assert "Running stage 'prepare'" not in exp.stdout

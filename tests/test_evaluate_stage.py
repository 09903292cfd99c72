"""``stages/evaluate.py`` as DVC runs it: a subprocess in a workspace with a tiny model and Set5."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from vdsr import paper, tracking
from vdsr.evaluate import evaluate_folder, summary
from vdsr.models import ModelConfig, build_model, save_model
from vdsr.upscale import load_upscaler

from conftest import run_child

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE = REPO_ROOT / "stages" / "evaluate.py"


def stage_env() -> dict[str, str]:
    outside = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "MLFLOW_EXPERIMENT_NAME")
    env = {k: v for k, v in os.environ.items() if k not in outside}
    return env | {"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}


def run_stage(workspace: Path) -> subprocess.CompletedProcess:
    return run_child([sys.executable, str(STAGE)], cwd=workspace, env=stage_env(), timeout=300)


@pytest.fixture
def workspace(tmp_path: Path, set5_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What the evaluate stage finds after download, baseline and train: params, data, model, run."""
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {"sets": ["Set5"], "scales": [2]}}))
    shutil.copytree(set5_dir, tmp_path / "data" / "raw" / "Set5")
    torch.manual_seed(0)
    config = ModelConfig("vdsr", 3, 4)
    save_model(tmp_path / "models" / "model.pt", build_model(config), config, {"epochs": 1})
    run = tracking.start_run(repo_root=tmp_path, params={"train": {"depth": 3}}, tags={})
    run.log_metrics({"train/loss": 0.1}, step=1)
    run.end()
    (tmp_path / "models" / "mlflow_run.json").write_text(
        json.dumps({"run_id": run.run_id, "tracking_uri": run.tracking_uri})
    )
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "bicubic.json").write_text(json.dumps({"Set5": {"x2": {"psnr": 33.6634, "ssim": 0.9299}}}))
    return tmp_path


def test_stage_writes_metrics_report_figures_and_completes_the_run(workspace: Path) -> None:
    result = run_stage(workspace)
    assert result.returncode == 0, result.stderr

    table = json.loads((workspace / "metrics" / "eval.json").read_text())
    assert list(table) == ["Set5"] and list(table["Set5"]) == ["x2"]
    assert set(table["Set5"]["x2"]) == {"psnr", "ssim"}
    # the same numbers as `vdsr evaluate --model models/model.pt`
    upscaler = load_upscaler(workspace / "models" / "model.pt", "cpu")
    assert table == {"Set5": summary(evaluate_folder(workspace / "data" / "raw" / "Set5", [2], upscaler))}

    report = (workspace / "reports" / "results.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| Set5 | x2 |"))
    assert "33.66 / 0.9299" in row and "36.66 / 0.9542" in row and "37.53 / 0.9587" in row
    assert f"{table['Set5']['x2']['psnr']:.2f} / {table['Set5']['x2']['ssim']:.4f}" in row

    figures = sorted(p.name for p in (workspace / "plots" / "images").iterdir())
    assert figures == ["Set5_butterfly_x4.png"]  # Set14 is not evaluated here
    with Image.open(workspace / "plots" / "images" / figures[0]) as figure:
        assert figure.mode == "RGB" and figure.width > 3 * 256  # HR | bicubic | model, butterfly is 256 wide

    run_info = json.loads((workspace / "models" / "mlflow_run.json").read_text())
    client = MlflowClient(run_info["tracking_uri"])
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/Set5/x2/psnr"] == pytest.approx(table["Set5"]["x2"]["psnr"])
    assert run.data.metrics["eval/Set5/x2/ssim"] == pytest.approx(table["Set5"]["x2"]["ssim"])
    assert run.data.metrics["train/loss"] == 0.1  # the train stage's run, completed, not a new one
    artifacts = {a.path for a in client.list_artifacts(run_info["run_id"], "eval")}
    assert {"eval/results.md", "eval/eval.json", "eval/images"} <= artifacts
    images = [a.path for a in client.list_artifacts(run_info["run_id"], "eval/images")]
    assert images == ["eval/images/Set5_butterfly_x4.png"]


def test_stage_without_mlflow_run_still_writes_its_outputs(workspace: Path) -> None:
    (workspace / "models" / "mlflow_run.json").write_text(json.dumps({"run_id": None, "tracking_uri": "x"}))
    result = run_stage(workspace)
    assert result.returncode == 0, result.stderr
    assert "tracking is off" in result.stderr
    assert (workspace / "metrics" / "eval.json").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        ("scales", "evaluate.scales[0]: expected 2, 3 or 4, got 5"),
        ("sets", "evaluate.sets[0]: expected a folder of data/raw, got 'Set99'"),
        ("model", "models/model.pt: model file not found"),
    ],
)
def test_stage_stops_with_a_clear_error(workspace: Path, change: str, message: str) -> None:
    params = {"evaluate": {"sets": ["Set5"], "scales": [2]}}
    if change == "scales":
        params["evaluate"]["scales"] = [5]
    elif change == "sets":
        params["evaluate"]["sets"] = ["Set99"]
    else:
        (workspace / "models" / "model.pt").unlink()
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage(workspace)
    assert result.returncode == 1
    assert message in result.stderr
    assert not (workspace / "metrics" / "eval.json").exists()


def test_results_table_marks_missing_values() -> None:
    ours = {"Set5": {"x3": {"psnr": 33.0, "ssim": 0.92}}, "Mine": {"x2": {"psnr": 30.0, "ssim": 0.9}}}
    table = paper.results_table(ours, {"Set5": {"x3": {"psnr": 30.4, "ssim": 0.868}}}, "VDSR d20")
    lines = table.splitlines()
    assert lines[2] == (
        "| Set5 | x3 | 30.40 / 0.8680 | 33.00 / 0.9200 | 30.39 / 0.8682 | 32.75 / 0.9090 | 33.66 / 0.9213 | -0.66 |"
    )
    assert lines[3] == "| Mine | x2 | – | 30.00 / 0.9000 | – | – | – | – |"

"""``stages/evaluate.py`` and ``stages/report.py`` as DVC runs them: subprocesses in a workspace with
two tiny models (vdsr, srcnn) and Set5."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import run_child
from mlflow.tracking import MlflowClient
from PIL import Image

from vdsr import paper, tracking
from vdsr.evaluate import evaluate_folder, summary, to_uint8
from vdsr.inference import load_upscaler, model_upscaler, predict_window, predict_y
from vdsr.models import ModelConfig, build_model, save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = REPO_ROOT / "stages"
MODELS = {"vdsr": ModelConfig("vdsr", 3, 4), "srcnn": ModelConfig("srcnn", 3, 4)}


def stage_env(**extra: str) -> dict[str, str]:
    outside = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME", "VDSR_PIPELINE_RUN_ID")
    env = {k: v for k, v in os.environ.items() if k not in outside}
    return env | {"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"} | extra


def run_stage(workspace: Path, stage: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_child([sys.executable, str(STAGES / f"{stage}.py"), *args], cwd=workspace, env=env or stage_env(),
                     timeout=300)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture
def workspace(tmp_path: Path, set5_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What the evaluate stages find after download, baseline and train@vdsr/srcnn: params, data,
    two tiny models and their MLflow runs."""
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    params = {"baseline": {"sets": ["Set5"], "scales": [2, 4]}, "evaluate": {"sets": ["Set5"], "scales": [2, 4]},
              "train": {name: {"model": config.name} for name, config in MODELS.items()}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(set5_dir, tmp_path / "data" / "raw" / "Set5")
    torch.manual_seed(0)
    for name, config in MODELS.items():
        save_model(tmp_path / "models" / f"{name}.pt", build_model(config), config, {"epochs": 1})
        run = tracking.start_run(repo_root=tmp_path, params={"train": {"model": name}}, tags={})
        run.log_metrics({"train/loss": 0.1}, step=1)
        run.end()
        (tmp_path / "models" / f"{name}.mlflow_run.json").write_text(
            json.dumps({"run_id": run.run_id, "tracking_uri": run.tracking_uri}))
    return tmp_path


def test_evaluate_stage_scores_every_image_and_completes_the_run(workspace: Path) -> None:
    check(run_stage(workspace, "evaluate", "vdsr"))
    results = json.loads((workspace / "results" / "vdsr.json").read_text())
    # the same numbers as `vdsr evaluate --model models/vdsr.pt`, every image and the means
    upscaler = load_upscaler(workspace / "models" / "vdsr.pt", "cpu")
    assert results["sets"] == {"Set5": evaluate_folder(workspace / "data" / "raw" / "Set5", [2, 4], upscaler)}
    assert sorted(results["sets"]["Set5"]["x4"]["images"]) == ["baby", "bird", "butterfly", "head", "woman"]
    assert results["model"]["architecture"] == "vdsr" and results["seconds"]["Set5"] > 0
    assert results["threads"] >= 1 and results["device"] == "cpu"
    # metrics/eval_vdsr.json, a DVC metrics file: the means only, model first (dvc exp show columns vdsr.Set5.x2.psnr)
    means = json.loads((workspace / "metrics" / "eval_vdsr.json").read_text())
    assert means == {"vdsr": {"Set5": summary(results["sets"]["Set5"])}}
    assert list(means["vdsr"]["Set5"]) == ["x2", "x4"] and set(means["vdsr"]["Set5"]["x4"]) == {"psnr", "ssim"}

    run_info = json.loads((workspace / "models" / "vdsr.mlflow_run.json").read_text())
    assert run_info["tracking_uri"] == "sqlite:///mlflow.db"  # relative to the repository: no machine path
    assert results["mlflow_run"] == {"run_id": run_info["run_id"], "started_run_id": run_info["run_id"],
                                     "tracking_uri": "sqlite:///mlflow.db", "training_run_id": run_info["run_id"]}
    client = MlflowClient(tracking.reachable_uri(run_info["tracking_uri"], workspace))
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    table = summary(results["sets"]["Set5"])
    assert run.data.metrics["eval/Set5/x2/psnr"] == pytest.approx(table["x2"]["psnr"])
    assert run.data.metrics["eval/Set5/x4/ssim"] == pytest.approx(table["x4"]["ssim"])
    assert run.data.metrics["train/loss"] == 0.1  # the train stage's run, completed, not a new one
    assert [a.path for a in client.list_artifacts(run_info["run_id"], "eval")] == ["eval/vdsr.json"]


def test_report_stage_writes_table_per_image_scores_gains_and_panels(workspace: Path) -> None:
    check(run_stage(workspace, "baseline"))
    for name in MODELS:
        check(run_stage(workspace, "evaluate", name))
    check(run_stage(workspace, "report"))
    results = {name: json.loads((workspace / "results" / f"{name}.json").read_text())["sets"]
               for name in ("bicubic", *MODELS)}

    # metrics/eval.json: ours, the paper's and the difference, for every method, set and scale
    metrics = json.loads((workspace / "metrics" / "eval.json").read_text())
    assert list(metrics) == ["Set5"] and list(metrics["Set5"]) == ["x2", "x4"]
    for scale in ("x2", "x4"):
        for method in ("bicubic", "srcnn", "vdsr"):
            ours, paper_psnr = results[method]["Set5"][scale], paper.TABLE3["Set5"][scale][method][0]
            entry = metrics["Set5"][scale][method]
            assert entry["psnr"] == round(ours["psnr"], 4) and entry["paper_psnr"] == paper_psnr
            assert entry["psnr_vs_paper"] == pytest.approx(ours["psnr"] - paper_psnr, abs=1e-4)
    assert metrics["Set5"]["x2"]["bicubic"]["psnr"] == pytest.approx(33.66, abs=0.01)

    # reports/results.md: Table 3's layout, bicubic | SRCNN | VDSR, each paper | ours | difference
    report = (workspace / "reports" / "results.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| Dataset |"))
    assert header.index("bicubic: paper") < header.index("srcnn: paper") < header.index("vdsr: paper")
    row = next(line for line in report.splitlines() if line.startswith("| Set5 | x2 |"))
    vdsr = results["vdsr"]["Set5"]["x2"]
    assert row.startswith("| Set5 | x2 | 33.66 / 0.9299 | 33.66 / 0.9299 | +0.00 | 36.66 / 0.9542 |")
    assert f"| 37.53 / 0.9587 | {vdsr['psnr']:.2f} / {vdsr['ssim']:.4f} | {vdsr['psnr'] - 37.53:+.2f} |" in row

    # reports/per_image.csv: every image and scale, each method's scores as in the results files
    with open(workspace / "reports" / "per_image.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 * 2
    for row in rows:
        for method in ("bicubic", "srcnn", "vdsr"):
            scores = results[method][row["set"]][f"x{row['scale']}"]["images"][row["image"]]
            assert float(row[f"{method}_psnr"]) == pytest.approx(scores["psnr"], abs=1e-4)
            assert float(row[f"{method}_ssim"]) == pytest.approx(scores["ssim"], abs=1e-4)
    gain = {(r["image"], r["scale"]): float(r["vdsr_psnr"]) - float(r["bicubic_psnr"]) for r in rows}
    best, worst = max(gain, key=gain.get), min(gain, key=gain.get)
    section = report[report.index("gains most and least"):]
    assert f"| most | Set5 | {best[0]} | x{best[1]} | {gain[best]:+.2f} |" in section.splitlines()[4]
    assert f"| least | Set5 | {worst[0]} | x{worst[1]} | {gain[worst]:+.2f} |" in section
    assert "| vdsr | cpu" in report  # evaluation time per set

    # the comparison panel: HR | bicubic | srcnn | vdsr crops, 3x zoom (Set14 is not evaluated here)
    assert sorted(p.name for p in (workspace / "plots" / "comparison").iterdir()) == ["Set5_butterfly_x4.png"]
    with Image.open(workspace / "plots" / "comparison" / "Set5_butterfly_x4.png") as figure:
        assert figure.mode == "RGB" and figure.width == 4 * 96 * 3 + 3 * 8
    for name in MODELS:
        run_info = json.loads((workspace / "models" / f"{name}.mlflow_run.json").read_text())
        client = MlflowClient(tracking.reachable_uri(run_info["tracking_uri"], workspace))
        found = {a.path for a in client.list_artifacts(run_info["run_id"], "report")}
        assert {"report/results.md", "report/eval.json", "report/per_image.csv", "report/comparison"} <= found
        assert client.get_run(run_info["run_id"]).info.status == "FINISHED"


def artifact_text(client: MlflowClient, run_id: str, path: str, tmp: Path) -> str:
    return Path(client.download_artifacts(run_id, path, str(tmp))).read_text()


def test_an_experiment_that_skips_a_model_leaves_the_earlier_run_as_it_was(workspace: Path, tmp_path: Path) -> None:
    """Two DVC experiments as the stages see them: the first (the workspace) evaluates and reports
    both models; the second (``DVC_EXP_NAME=second``) retrains VDSR only, so SRCNN's files are still
    the first's. The second's report must not rewrite SRCNN's run of the first: it gets a new run.
    A report run again, and an evaluation of a model file from another run, get new runs too."""
    client = MlflowClient(tracking.reachable_uri("sqlite:///mlflow.db", workspace))
    check(run_stage(workspace, "baseline"))
    for name in MODELS:
        check(run_stage(workspace, "evaluate", name))
    check(run_stage(workspace, "report"))
    first = {name: json.loads((workspace / "models" / f"{name}.mlflow_run.json").read_text())["run_id"] for name in MODELS}
    srcnn = client.get_run(first["srcnn"])
    srcnn_report = artifact_text(client, first["srcnn"], "report/results.md", tmp_path / "before")
    assert srcnn_report == (workspace / "reports" / "results.md").read_text()

    # The second experiment: train@vdsr ran (a new model and run), train@srcnn and evaluate@srcnn did not.
    second = stage_env(DVC_EXP_NAME="second", VDSR_PIPELINE_RUN_ID="pipeline-2")
    torch.manual_seed(1)
    run = tracking.start_run(repo_root=workspace, params={"train": {"model": "vdsr"}}, tags={"dvc.exp_name": "second"})
    run.end()
    save_model(workspace / "models" / "vdsr.pt", build_model(MODELS["vdsr"]), MODELS["vdsr"],
               {"epochs": 1, "mlflow_run_id": run.run_id})
    (workspace / "models" / "vdsr.mlflow_run.json").write_text(json.dumps(run.record()))
    check(run_stage(workspace, "evaluate", "vdsr", env=second))
    report = run_stage(workspace, "report", env=second)
    check(report)

    after = client.get_run(first["srcnn"])  # untouched: report, end time, tags
    assert artifact_text(client, first["srcnn"], "report/results.md", tmp_path / "after") == srcnn_report
    assert (after.info.end_time, after.data.tags, after.data.metrics) == (srcnn.info.end_time, srcnn.data.tags,
                                                                           srcnn.data.metrics)
    assert f"run {first['srcnn']} belongs to the workspace (no DVC experiment), not to DVC experiment 'second': " \
           "starting a new run for the report of srcnn" in report.stderr, report.stderr
    new_report = (workspace / "reports" / "results.md").read_text()
    assert new_report != srcnn_report
    experiment = srcnn.info.experiment_id
    [new] = client.search_runs([experiment], f"tags.`pipeline.source_run_id` = '{first['srcnn']}'")
    assert new.info.run_name == "srcnn second report" and new.info.status == "FINISHED"
    assert new.data.tags["dvc.exp_name"] == "second" and new.data.tags["pipeline.run_id"] == "pipeline-2"
    assert new.data.tags["stage"] == "report" and new.data.tags["pipeline.model"] == "srcnn"
    assert new.data.params["train.model"] == "srcnn"  # the params of the run it stands beside
    assert artifact_text(client, new.info.run_id, "report/results.md", tmp_path / "new") == new_report
    # VDSR's run is the second experiment's own: evaluated and reported there, no extra run
    vdsr = client.get_run(run.run_id)
    assert vdsr.data.tags["pipeline.evaluate.run_id"] == vdsr.data.tags["pipeline.report.run_id"] == "pipeline-2"
    assert artifact_text(client, run.run_id, "report/results.md", tmp_path / "vdsr") == new_report
    assert len(client.search_runs([experiment])) == 4

    # The same report again (another pipeline run): VDSR's run already holds one, so a new run.
    again = run_stage(workspace, "report", env=stage_env(DVC_EXP_NAME="second", VDSR_PIPELINE_RUN_ID="pipeline-3"))
    check(again)
    assert f"run {run.run_id} already holds the report results of pipeline run pipeline-2" in again.stderr
    assert artifact_text(client, run.run_id, "report/results.md", tmp_path / "vdsr2") == new_report
    # A model file trained in another run than models/vdsr.mlflow_run.json names: a new evaluation run.
    (workspace / "models" / "vdsr.mlflow_run.json").write_text(json.dumps({**run.record(), "run_id": first["vdsr"]}))
    mismatch = run_stage(workspace, "evaluate", "vdsr")
    check(mismatch)
    assert f"the model file was trained in run {run.run_id}, not in run {first['vdsr']}" in mismatch.stderr
    assert json.loads((workspace / "results" / "vdsr.json").read_text())["mlflow_run"]["run_id"] not in first.values()


def test_crops_and_tiles_equal_whole_image_inference(workspace: Path) -> None:
    """The report runs the models on a crop plus their receptive field, the evaluate stage on tiles
    with that margin: the same values as a whole-image pass (to float32 rounding: the convolution
    kernels may sum in another order on another size), so the same uint8 estimates but for a rare
    pixel on a rounding edge, and the same scores to 1e-4 dB."""
    model = build_model(MODELS["vdsr"]).eval()
    y = np.random.default_rng(0).random((70, 90))
    whole = predict_y(model, y, "cpu", tile=0)
    for box in [(0, 0, 20, 30), (25, 40, 70, 90), (10, 5, 12, 7)]:
        top, left, bottom, right = box
        crop = predict_window(model, y, box, "cpu")
        assert np.abs(crop - whole[top:bottom, left:right]).max() < 5e-7, box
        assert np.array_equal(to_uint8(crop), to_uint8(whole[top:bottom, left:right])), box
    tiled = predict_y(model, y, "cpu", tile=16)
    assert np.abs(tiled - whole).max() < 5e-7 and np.array_equal(to_uint8(tiled), to_uint8(whole))
    folder = workspace / "data" / "raw" / "Set5"
    by_tiles = evaluate_folder(folder, [4], model_upscaler(model, torch.device("cpu"), tile=48))["x4"]["images"]
    by_image = evaluate_folder(folder, [4], model_upscaler(model, torch.device("cpu"), tile=0))["x4"]["images"]
    for name, scores in by_image.items():
        assert by_tiles[name]["psnr"] == pytest.approx(scores["psnr"], abs=1e-4), name
        assert by_tiles[name]["ssim"] == pytest.approx(scores["ssim"], abs=1e-5), name


def test_evaluate_stage_without_mlflow_run_still_writes_its_results(workspace: Path) -> None:
    (workspace / "models" / "vdsr.mlflow_run.json").write_text(json.dumps({"run_id": None, "tracking_uri": "x"}))
    result = run_stage(workspace, "evaluate", "vdsr")
    check(result)
    assert "tracking is off" in result.stderr
    assert (workspace / "results" / "vdsr.json").is_file()


@pytest.mark.parametrize(
    "change, message",
    [
        ("scales", "evaluate.scales[0]: expected 2, 3 or 4, got 5"),
        ("sets", "evaluate.sets[0]: expected a folder of data/raw, got 'Set99'"),
        ("model", "models/vdsr.pt: model file not found"),
    ],
)
def test_evaluate_stage_stops_with_a_clear_error(workspace: Path, change: str, message: str) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    if change == "scales":
        params["evaluate"]["scales"] = [5]
    elif change == "sets":
        params["evaluate"]["sets"] = ["Set99"]
    else:
        (workspace / "models" / "vdsr.pt").unlink()
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_stage(workspace, "evaluate", "vdsr")
    assert result.returncode == 1
    assert message in result.stderr
    assert not (workspace / "results").exists()


def test_report_stage_names_a_missing_evaluation(workspace: Path) -> None:
    check(run_stage(workspace, "baseline"))
    check(run_stage(workspace, "evaluate", "vdsr"))
    result = run_stage(workspace, "report")
    assert result.returncode == 1 and "report: error: results/srcnn.json" in result.stderr, result.stderr
    assert not (workspace / "metrics" / "eval.json").exists()


def test_results_table_marks_missing_values() -> None:
    ours = {"Set5": {"x3": {"psnr": 33.0, "ssim": 0.92}}, "Mine": {"x2": {"psnr": 30.0, "ssim": 0.9}}}
    columns = [paper.Column("bicubic", "bicubic", {"Set5": {"x3": {"psnr": 30.4, "ssim": 0.868}}}),
               paper.Column("vdsr", "vdsr", ours)]
    lines = paper.results_table(columns).splitlines()
    assert lines[0] == "| Dataset | Scale | bicubic: paper | bicubic: ours | Δ dB | vdsr: paper | vdsr: ours | Δ dB |"
    assert lines[2] == "| Set5 | x3 | 30.39 / 0.8682 | 30.40 / 0.8680 | +0.01 | 33.66 / 0.9213 | 33.00 / 0.9200 | -0.66 |"
    assert paper.results_table(columns[::-1]).splitlines()[3] == "| Mine | x2 | – | 30.00 / 0.9000 | – | – | – | – |"


def test_self_ensemble_key_adds_its_own_row(workspace: Path) -> None:
    """evaluate.self_ensemble: the x8 self-ensemble's scores beside (never instead of) the plain ones,
    its own MLflow metrics and its own report column, "vdsr+ (x8 self-ensemble)"."""
    from vdsr.inference import self_ensemble

    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["evaluate"] |= {"scales": [2], "self_ensemble": True}
    params["baseline"]["scales"] = [2]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    check(run_stage(workspace, "baseline"))
    for name in MODELS:
        check(run_stage(workspace, "evaluate", name))
    results = json.loads((workspace / "results" / "vdsr.json").read_text())
    upscaler = load_upscaler(workspace / "models" / "vdsr.pt", "cpu")
    folder = workspace / "data" / "raw" / "Set5"
    assert results["sets"] == {"Set5": evaluate_folder(folder, [2], upscaler)}  # the plain scores, unchanged
    assert results["self_ensemble_sets"] == {"Set5": evaluate_folder(folder, [2], self_ensemble(upscaler))}
    run_info = json.loads((workspace / "models" / "vdsr.mlflow_run.json").read_text())
    metrics = MlflowClient(tracking.reachable_uri(run_info["tracking_uri"], workspace)).get_run(
        results["mlflow_run"]["run_id"]).data.metrics
    plus = summary(results["self_ensemble_sets"]["Set5"])["x2"]["psnr"]
    assert metrics["eval_self_ensemble/Set5/x2/psnr"] == pytest.approx(plus)
    assert metrics["eval/Set5/x2/psnr"] != pytest.approx(plus)
    check(run_stage(workspace, "report"))
    report = (workspace / "reports" / "results.md").read_text()
    assert "vdsr+ (x8 self-ensemble) (vdsr): ours" in report and f"{plus:.2f} / " in report

"""The tiny pipeline against a real ``mlflow server`` on 127.0.0.1: what a run holds (REST API),
what the dashboard shows (headless Chromium), and a server that is down from the start or dies
in the middle of training."""

from __future__ import annotations

import csv
import json
import re
import shutil
import statistics
import time
from pathlib import Path

import pytest
from conftest import run_checked
from mlflow_server import (
    Streamed,
    keep_artifact,
    list_artifacts,
    open_page,
    rest,
    stage_lines,
    stage_output,
    stage_seconds,
    visible_text,
)

pytest_plugins = ["mlflow_server"]  # fixtures tiny_repo and tracking_server

REPRO_TIMEOUT_S = 600  # the tiny pipeline takes ~20-40 s; the bound only stops a hung run


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def assert_outputs_complete(repo: Path, epochs: int) -> None:
    """The DVC record of a run is whole, whatever happened to MLflow."""
    train = read_json(repo / "metrics/train_vdsr.json")
    assert train["epochs"] == epochs and train["val_psnr_x2"] > 20, train
    with open(repo / "plots/train_vdsr.csv") as handle:
        assert [row["epoch"] for row in csv.DictReader(handle)] == [str(e) for e in range(1, epochs + 1)]
    assert {"psnr", "ssim", "paper_psnr"} <= set(read_json(repo / "metrics/eval.json")["Set5"]["x2"]["vdsr"])
    from vdsr.models import load_model

    _model, config, meta = load_model(repo / "models/vdsr.pt")
    assert (config.depth, config.width) == (3, 8) and meta["epochs"] == epochs
    assert (repo / "reports/results.md").is_file() and list((repo / "plots/comparison").glob("*.png"))


def test_tiny_pipeline_run_on_a_tracking_server_and_its_dashboard_page(tiny_repo, tracking_server, tmp_path):
    repo, env = tiny_repo()
    env["MLFLOW_TRACKING_URI"] = tracking_server.url
    repro = Streamed(["dvc", "repro"], repo, env).check(REPRO_TIMEOUT_S)
    print(f"dvc repro {repro.lines[-1][0]:.0f} s, train stage {stage_seconds(repro, 'train@vdsr'):.1f} s")
    assert "WARNING" not in stage_output(repro, "train@vdsr") + stage_output(repro, "evaluate@vdsr")
    run_file = read_json(repo / "models/vdsr.mlflow_run.json")
    run_id, url = run_file["run_id"], tracking_server.url
    assert run_id and run_file["tracking_uri"] == url

    experiment = rest(url, "experiments/get-by-name", {"experiment_name": "vdsr"})["experiment"]
    found = rest(url, "runs/search", body={"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert [r["info"]["run_id"] for r in found] == [run_id]
    run = rest(url, "runs/get", {"run_id": run_id})["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.lr"] == "0.001" and params["train.optimizer"] == "adam" and params["train.epochs"] == "2"
    for name in ("train_loss", "lr", "val_psnr_x2"):
        history = rest(url, "metrics/get-history", {"run_id": run_id, "metric_key": name})["metrics"]
        assert [m["step"] for m in history] == [1, 2], (name, history)
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    eval_json = read_json(repo / "metrics/eval.json")
    assert metrics["eval/Set5/x2/psnr"] == pytest.approx(eval_json["Set5"]["x2"]["vdsr"]["psnr"])
    assert metrics["eval/Set5/x2/ssim"] == pytest.approx(eval_json["Set5"]["x2"]["vdsr"]["ssim"])
    assert metrics["val_psnr_x2"] == pytest.approx(read_json(repo / "metrics/train_vdsr.json")["val_psnr_x2"], abs=1e-3)

    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    head = run_checked(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    assert tags["git.commit"] == head and tags["mlflow.source.git.commit"] == head
    assert tags["dvc.stage"] == "train@vdsr" and tags["pipeline.model"] == "vdsr" and tags["torch.version"] and tags["device"].startswith("cpu")
    assert len(tags["data.train_sha256"]) == 64
    assert {"dvc.md5.data/manifest.json", "dvc.md5.data/raw", "dvc.md5.data/prepared"} <= set(tags)

    artifacts = list_artifacts(url, run_id)
    assert {"metrics/train_vdsr.json", "plots/train_vdsr.csv", "eval/vdsr.json", "report/eval.json",
            "report/results.md", "report/per_image.csv", "report/comparison/Set5_butterfly_x4.png"} <= set(artifacts), artifacts
    # MLflow 3 keeps a logged model beside the run ("Logged models"), linked by source_run_id.
    models = rest(url, "logged-models/search", body={"experiment_ids": [experiment["experiment_id"]]})["models"]
    assert [(m["info"]["name"], m["info"]["source_run_id"], m["info"]["status"]) for m in models] == [
        ("model", run_id, "LOGGED_MODEL_READY")]
    model_files = rest(url, f"logged-models/{models[0]['info']['model_id']}/artifacts/directories")["files"]
    assert {"MLmodel", "data"} <= {f["path"] for f in model_files}

    # The dashboard's run page, as a browser renders it.
    page = f"{url}/#/experiments/{experiment['experiment_id']}/runs/{run_id}"
    screenshot = tmp_path / "mlflow-run-page.png"
    text = visible_text(open_page(page, tmp_path, screenshot))
    keep_artifact(screenshot)
    assert run["info"]["run_name"] in text and "Finished" in text, text[:3000]
    for name in ("eval/Set5/x2/psnr", "eval/Set5/x2/ssim", "val_psnr_x2", "train_loss"):
        shown = repr(metrics[name]).removesuffix(".0")  # JavaScript's shortest round-trip form
        assert f"{name} {shown}" in text, (name, shown, text[:3000])
    assert "train.lr 0.001" in text and f"git.commit : {head}" in text, text[:3000]
    assert screenshot.stat().st_size > 10_000

    # The experiment is one of model training, and the link the train stage logs opens its runs
    # (MLflow 3.17 otherwise opens on an empty GenAI overview of traces and token usage).
    kind = {t["key"]: t["value"] for t in experiment.get("tags", [])}.get("mlflow.experimentKind")
    assert kind == "custom_model_development", experiment
    link = re.search(r"dashboard (\S+)", stage_output(repro, "train@vdsr"))[1]
    assert link == f"{url}/#/experiments/{experiment['experiment_id']}/runs/{run_id}?workflowType=machine_learning"
    experiment_page = f"{url}/#/experiments/{experiment['experiment_id']}?workflowType=machine_learning"
    screenshot = tmp_path / "mlflow-experiment-page.png"
    text = visible_text(open_page(experiment_page, tmp_path, screenshot))
    keep_artifact(screenshot)
    assert f"{run['info']['run_name']} " in text and "1 matching run" in text, text[:3000]
    assert "Token Usage" not in text and "Agent versions" not in text, text[:3000]


def test_unreachable_server_costs_seconds_not_the_run(tiny_repo, closed_port_url):
    repo, env = tiny_repo()
    normal = Streamed(["dvc", "repro"], repo, env).check(REPRO_TIMEOUT_S)  # default SQLite store
    normal_s = stage_seconds(normal, "train@vdsr")

    env["MLFLOW_TRACKING_URI"] = closed_port_url.rstrip("/")
    shutil.rmtree(repo / "checkpoints")  # else the forced run resumes after the last epoch and trains nothing
    down = Streamed(["dvc", "repro", "--force", "--single-item", "train@vdsr", "evaluate@vdsr", "report"], repo, env).check(REPRO_TIMEOUT_S)
    down_s = stage_seconds(down, "train@vdsr")
    train_lines = stage_lines(down, "train@vdsr")
    train_out, evaluate_out = stage_output(down, "train@vdsr"), stage_output(down, "evaluate@vdsr")
    warned = [(t, line) for t, line in train_lines if "tracking is off" in line]
    assert len(warned) == 1, train_out
    print(f"train stage: {normal_s:.1f} s with the SQLite store, {down_s:.1f} s with the server down; "
          f"warning {warned[0][0] - train_lines[0][0]:.1f} s after the stage started")
    assert closed_port_url.rstrip("/") in warned[0][1] and "Connection refused" in warned[0][1], warned
    first_epoch = next(t for t, line in train_lines if line.startswith("epoch 1:"))
    assert warned[0][0] < first_epoch, "the warning must come before training, not after"
    assert warned[0][0] - train_lines[0][0] < 30, "the warning must come within seconds of the stage start"
    assert down_s - normal_s < 15, (normal_s, down_s)

    summary = [line for line in train_out.splitlines() if "WARNING: not logged to MLflow" in line]
    assert len(summary) == 1, train_out
    for what in (r"\d+ params", r"\d+ tags", r"\d+ metric values", "artifact metrics/train_vdsr.json", r"\bmodel\b"):
        assert re.search(what, summary[0]), (what, summary[0])
    assert "logged no MLflow run" in evaluate_out, evaluate_out
    summary = [line for line in evaluate_out.splitlines() if "WARNING: not logged to MLflow" in line]
    assert len(summary) == 1 and "metric values" in summary[0] and "results/vdsr.json" in summary[0], evaluate_out
    assert "logged no MLflow run" in stage_output(down, "report")
    assert read_json(repo / "models/vdsr.mlflow_run.json") == {
        "run_id": None, "started_run_id": None, "tracking_uri": env["MLFLOW_TRACKING_URI"]}
    assert_outputs_complete(repo, epochs=2)
    shown = json.loads(run_checked(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    data = next(iter(shown.values()))["data"]
    assert {"metrics/train_vdsr.json", "metrics/eval.json"} <= set(data), data


def test_server_killed_during_training(tiny_repo, tracking_server):
    epochs = 6
    repo, env = tiny_repo(train={"vdsr": {"epochs": epochs, "steps_per_epoch": 15}})
    run_checked(["dvc", "repro", "prepare", "baseline"], repo, env, timeout=REPRO_TIMEOUT_S)
    env["MLFLOW_TRACKING_URI"] = url = tracking_server.url
    with Streamed(["dvc", "repro"], repo, env) as repro:
        started = repro.wait_for(r"mlflow: run \w+ in experiment", 300)[1]
        run_id = re.search(r"mlflow: run (\w+) in experiment", started)[1]
        repro.wait_for(r"^epoch 1: ", 300)
        deadline = time.monotonic() + 60
        while not rest(url, "metrics/get-history", {"run_id": run_id, "metric_key": "train_loss"}).get("metrics"):
            assert repro.process.poll() is None and time.monotonic() < deadline, repro.output[-4000:]
            time.sleep(0.05)
        killed_at = time.monotonic() - repro.started
        tracking_server.kill()
        repro.check(REPRO_TIMEOUT_S)

    train_lines = [(t, line) for t, line in stage_lines(repro, "train@vdsr") if t >= killed_at]
    train_out = "\n".join(line for _, line in train_lines)
    assert sum("tracking is off" in line for _, line in train_lines) == 1, train_out
    assert "logging metric values failed" in train_out and "not logged to MLflow" in train_out, train_out
    summary = next(line for _, line in train_lines if "WARNING: not logged to MLflow" in line)
    assert "metric values" in summary and "model" in summary, summary
    assert_outputs_complete(repo, epochs=epochs)
    # The run stays in the server's store with the epochs logged before the kill: the stage records
    # it as the started run, and no live run id for the evaluate stage to complete.
    run_file = read_json(repo / "models/vdsr.mlflow_run.json")
    assert run_file["run_id"] is None and run_file["started_run_id"] == run_id
    from mlflow.tracking import MlflowClient

    store = MlflowClient(f"sqlite:///{tracking_server.folder / 'mlflow.db'}")
    logged = [m.step for m in store.get_metric_history(run_id, "train_loss")]
    assert logged == list(range(1, len(logged) + 1)) and 1 <= len(logged) < epochs, logged
    assert store.get_run(run_id).info.status == "RUNNING"  # its end could not be sent

    # The switch to a no-op costs one bounded failure, not one per remaining call.
    epoch_times = [t for t, line in stage_lines(repro, "train@vdsr") if line.startswith("epoch ") and ": loss" in line]
    gaps = [b - a for a, b in zip(epoch_times, epoch_times[1:], strict=False)]
    after_kill = train_lines[-1][0] - killed_at
    print(f"epoch gaps {', '.join(f'{g:.1f}' for g in gaps)} s; train stage ended {after_kill:.1f} s after the kill")
    extra = after_kill - (epochs - 1) * statistics.median(gaps)
    assert extra < 15, (gaps, after_kill)
    assert "Running stage 'evaluate@vdsr'" in repro.output
    assert f"lost its MLflow run {run_id} mid-way" in stage_output(repro, "evaluate@vdsr")

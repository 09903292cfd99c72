"""``make smoke``: the whole pipeline (both models) as a real temporary ``dvc exp run`` on the CPU,
logged to MLflow, leaving the workspace as it was; its results come into the workspace with
``dvc exp apply``."""

from __future__ import annotations

import json
import re
import sqlite3

from conftest import run_checked

STAGES = ("download", "prepare", "baseline", "train@vdsr", "train@srcnn", "evaluate@vdsr", "evaluate@srcnn", "curves@vdsr", "curves@srcnn", "report")


def test_make_smoke_runs_the_pipeline_as_an_experiment_and_leaves_the_workspace(pipeline_repo) -> None:
    repo, env = pipeline_repo({})
    params_before = (repo / "params.yaml").read_bytes()
    result = run_checked(["make", "smoke", "SMOKE_NAME=smoke-test"], repo, env, timeout=900)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in result.stdout
    assert re.search(r"dvc exp apply smoke-test\b", result.stdout), result.stdout[-3000:]
    assert "dvc exp show" in result.stdout and "mlflow ui" in result.stdout, result.stdout[-3000:]

    # Nothing in the workspace changed: the next command sees the committed pipeline.
    assert run_checked(["git", "status", "--porcelain"], repo, env).stdout == ""
    assert (repo / "params.yaml").read_bytes() == params_before
    for path in ("dvc.lock", "metrics", "models/vdsr.pt", "plots", "data/raw", "data/prepared"):
        assert not (repo / path).exists(), path
    status = run_checked(["dvc", "status", "--json"], repo, env).stdout
    assert set(json.loads(status)) == set(STAGES), status

    # The results: an experiment in `dvc exp show`, one MLflow run per model in the repository's store.
    shown = run_checked(["dvc", "exp", "show", "--json"], repo, env).stdout
    assert "smoke-test" in shown
    with sqlite3.connect(repo / "mlflow.db") as db:
        found = db.execute("select name, run_uuid, status from runs where name like '% smoke-test'").fetchall()
    assert sorted((name, status) for name, _, status in found) == [("srcnn smoke-test", "FINISHED"),
                                                                   ("vdsr smoke-test", "FINISHED")], found
    run_ids = {name.split(" ")[0]: run_id for name, run_id, _ in found}  # run names: the model first

    # `dvc exp apply` brings params, outputs and metrics into the workspace, consistent with dvc.lock.
    run_checked(["dvc", "exp", "apply", "smoke-test"], repo, env)
    assert "depth: 6" in (repo / "params.yaml").read_text()
    assert "up to date" in run_checked(["dvc", "status"], repo, env).stdout
    bicubic = json.loads((repo / "metrics/bicubic.json").read_text())
    evaluated = json.loads((repo / "metrics/eval.json").read_text())
    assert set(evaluated) == {"Set5", "Set14"}
    for dataset in evaluated:
        for scale in ("x3", "x4"):  # a few hundred steps of a small VDSR already beat bicubic there
            assert evaluated[dataset][scale]["vdsr"]["psnr"] > bicubic[dataset][scale]["psnr"] + 0.3
            assert evaluated[dataset][scale]["bicubic"]["psnr"] == bicubic[dataset][scale]["psnr"]
    assert "| Set5 | x2 |" in (repo / "reports/results.md").read_text()
    assert sorted(p.name for p in (repo / "plots/comparison").iterdir()) == ["Set14_zebra_x3.png", "Set5_butterfly_x4.png"]
    cached = ["models/vdsr.pt", "models/srcnn.pt", "data/raw", "data/prepared"]  # DVC's cache holds them, not git
    assert run_checked(["git", "check-ignore", *cached], repo, env).stdout.split() == cached

    runs = {}
    with sqlite3.connect(repo / "mlflow.db") as db:
        for name in ("vdsr", "srcnn"):
            run_id = json.loads((repo / f"models/{name}.mlflow_run.json").read_text())["run_id"]
            assert run_id == run_ids[name]
            params = dict(db.execute("select key, value from params where run_uuid = ?", (run_id,)))
            metrics = {row[0] for row in db.execute("select key from metrics where run_uuid = ?", (run_id,))}
            tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)))
            runs[name] = tags
            assert params["train.model"] == name and params["prepare.train_sets"] == "['T91']"
            assert {"train_loss", "val_psnr_x2", "eval/Set5/x2/psnr", "eval/Set14/x4/ssim"} <= metrics
            assert tags["dvc.exp_name"] == "smoke-test" and tags["git.commit"] and tags["pipeline.model"] == name
    assert runs["vdsr"]["pipeline.run_id"] == runs["srcnn"]["pipeline.run_id"]

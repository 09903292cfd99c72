"""``make smoke``: the whole pipeline as a real ``dvc exp run`` on the CPU, logged to MLflow."""

from __future__ import annotations

import json
import sqlite3

from conftest import run_checked


def test_make_smoke_runs_the_pipeline_as_an_experiment(pipeline_repo) -> None:
    repo, env = pipeline_repo({})
    result = run_checked(["make", "smoke"], repo, env, timeout=600)
    for stage in ("download", "prepare", "baseline", "train@vdsr", "train@srcnn", "evaluate@vdsr",
                  "evaluate@srcnn", "report"):
        assert f"Running stage '{stage}'" in result.stdout

    bicubic = json.loads((repo / "metrics/bicubic.json").read_text())
    evaluated = json.loads((repo / "metrics/eval.json").read_text())
    assert set(evaluated) == {"Set5", "Set14"}
    for dataset in evaluated:
        for scale in ("x3", "x4"):  # a few hundred steps of a small VDSR already beat bicubic there
            assert evaluated[dataset][scale]["vdsr"]["psnr"] > bicubic[dataset][scale]["psnr"] + 0.3
            assert evaluated[dataset][scale]["bicubic"]["psnr"] == bicubic[dataset][scale]["psnr"]
    assert "| Set5 | x2 |" in (repo / "reports/results.md").read_text()
    assert sorted(p.name for p in (repo / "plots/comparison").iterdir()) == ["Set14_zebra_x3.png", "Set5_butterfly_x4.png"]

    runs = {}
    with sqlite3.connect(repo / "mlflow.db") as db:
        for name in ("vdsr", "srcnn"):
            run_id = json.loads((repo / f"models/{name}.mlflow_run.json").read_text())["run_id"]
            status = db.execute("select status from runs where run_uuid = ?", (run_id,)).fetchone()[0]
            params = dict(db.execute("select key, value from params where run_uuid = ?", (run_id,)))
            metrics = {row[0] for row in db.execute("select key from metrics where run_uuid = ?", (run_id,))}
            tags = dict(db.execute("select key, value from tags where run_uuid = ?", (run_id,)))
            runs[name] = tags
            assert status == "FINISHED"
            assert params["train.model"] == name and params["prepare.train_sets"] == "['T91']"
            assert {"train_loss", "val_psnr_x2", "eval/Set5/x2/psnr", "eval/Set14/x4/ssim"} <= metrics
            assert tags["dvc.exp_name"] and tags["git.commit"] and tags["pipeline.model"] == name
    assert runs["vdsr"]["pipeline.run_id"] == runs["srcnn"]["pipeline.run_id"]
    assert runs["vdsr"]["dvc.exp_name"] == runs["srcnn"]["dvc.exp_name"]

    shown = json.loads(run_checked(["dvc", "exp", "show", "--json"], repo, env).stdout)
    assert runs["vdsr"]["dvc.exp_name"] in json.dumps(shown)

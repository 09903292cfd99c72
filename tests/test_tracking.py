"""MLflow tracking against a real SQLite store in tmp_path, and against servers that are not there."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from vdsr import provenance, tracking

from conftest import abort_with_stacks, with_faulthandler


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No outside tracking configuration; HTTP bounds restored after each test."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME", *tracking.HTTP_DEFAULTS):
        monkeypatch.delenv(name, raising=False)


PARAMS = {"train": {"lr": 0.1, "seed": 0, "model": "vdsr"}, "evaluate": {"sets": ["Set5", "Set14"]}}


def test_run_in_a_sqlite_store_logs_and_resumes(tmp_path: Path) -> None:
    run = tracking.start_run(repo_root=tmp_path, params=PARAMS, tags={"purpose": "test"})
    assert run.run_id is not None
    assert run.tracking_uri == "sqlite:///mlflow.db"  # as written to models/<name>.mlflow_run.json: no machine path
    for step in (1, 2):
        run.log_metrics({"train/loss": 1.0 / step, "val/psnr_x2": 30.0 + step}, step=step)
    report = tmp_path / "results.md"
    report.write_text("| a | b |\n")
    run.log_artifact(report, "eval")
    run.set_tags({"device": "cpu"})
    run.end()

    client = MlflowClient(tracking.reachable_uri(run.tracking_uri, tmp_path))
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params == {
        "train.lr": "0.1", "train.seed": "0", "train.model": "vdsr", "evaluate.sets": "['Set5', 'Set14']"
    }
    assert [m.value for m in client.get_metric_history(run.run_id, "train/loss")] == [1.0, 0.5]
    assert logged.data.tags["purpose"] == "test" and logged.data.tags["device"] == "cpu"
    experiment = client.get_experiment(logged.info.experiment_id)
    assert experiment.name == "vdsr"
    assert experiment.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()
    assert [a.path for a in client.list_artifacts(run.run_id, "eval")] == ["eval/results.md"]

    resumed = tracking.resume_run(repo_root=tmp_path, run_id=run.run_id)
    assert resumed.run_id == run.run_id
    resumed.log_metrics({"eval/Set5/x2/psnr": 33.5})
    resumed.end()
    logged = client.get_run(run.run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.metrics["eval/Set5/x2/psnr"] == 33.5
    assert logged.data.metrics["train/loss"] == 0.5


def test_experiment_name_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ablation")
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={})
    run.end()
    client = MlflowClient(tracking.reachable_uri(run.tracking_uri, tmp_path))
    assert client.get_experiment(client.get_run(run.run_id).info.experiment_id).name == "ablation"


def test_experiment_is_marked_as_model_training_with_its_set5_view(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLflow 3 UI opens an experiment by its kind: ours opens on the training runs; and it
    carries the saved view that the README's link opens (tests/test_experiment_docs.py shows it in
    a browser): the envelope of MLflow 3.17's "Save view", its state a JSON string inside."""
    import json

    uri = f"sqlite:///{tmp_path.resolve().as_posix()}/mlflow.db"
    client = MlflowClient(uri)
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={})
    run.end()
    created = client.get_experiment(client.get_run(run.run_id).info.experiment_id)
    assert created.tags["mlflow.experimentKind"] == "custom_model_development"
    view = "mlflow.sharedViewState.set5"
    envelope = json.loads(created.tags[view])
    assert envelope["name"] == "Set5 PSNR" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["orderByKey"] == "metrics.`eval/Set5/x2/psnr`" and state["orderByAsc"] is False
    assert state["selectedColumns"] == ["params.`train.model`"] + [f"metrics.`eval/Set5/x{s}/psnr`" for s in (2, 3, 4)]

    # An experiment made without the tags (an older version of this code, or by hand) gets them;
    # a kind the user chose, or a view saved over ours, in the UI stays.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "untagged")
    untagged = client.create_experiment("untagged")
    tracking.start_run(repo_root=tmp_path, params={}, tags={}).end()
    tags = client.get_experiment(untagged).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development" and json.loads(tags[view])["name"] == "Set5 PSNR"
    client.set_experiment_tag(untagged, "mlflow.experimentKind", "genai_development")
    client.set_experiment_tag(untagged, view, json.dumps({**envelope, "name": "mine"}))
    tracking.start_run(repo_root=tmp_path, params={}, tags={}).end()
    tags = client.get_experiment(untagged).tags
    assert tags["mlflow.experimentKind"] == "genai_development" and json.loads(tags[view])["name"] == "mine"


def test_log_model_is_loadable_at_other_sizes(tmp_path: Path) -> None:
    import mlflow.pytorch

    torch.manual_seed(0)
    conv = torch.nn.Conv2d
    model = torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.ReLU(), conv(4, 1, 3, padding=1))
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={})
    run.log_model(model, np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32))
    run.end()
    assert run.run_id is not None and not run._not_logged
    loaded = mlflow.pytorch.load_model(f"runs:/{run.run_id}/model")
    x = torch.rand(3, 1, 23, 19)  # another batch size and image size than the example
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_log_model_with_a_bad_example_warns_and_tracking_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller's wrong ``input_example`` (not NCHW, or N < 2) is named in a warning; the run goes on."""
    caplog.set_level(logging.INFO, logger="vdsr.tracking")
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={})
    for bad in (np.zeros((1, 1, 8, 8), np.float32), np.zeros((1, 8, 8), np.float32)):
        run.log_model(torch.nn.Conv2d(1, 1, 3), bad)
    run.log_metrics({"loss": 1.0}, step=1)
    run.end()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "(1, 1, 8, 8)" in warnings[0] and "(1, 8, 8)" in warnings[1] and "not logged" in warnings[0]
    client = MlflowClient(tracking.default_tracking_uri(tmp_path))
    assert client.get_run(run.run_id).data.metrics == {"loss": 1.0}
    assert not [a.path for a in client.list_artifacts(run.run_id) if a.path == "model"]


def test_store_location_follows_dvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    user_repo, copy = tmp_path / "repo", tmp_path / "elsewhere"
    assert tracking.default_tracking_uri(copy) == f"sqlite:///{copy.resolve().as_posix()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(user_repo))  # what DVC sets, also in exp run --temp/--queue
    assert tracking.default_tracking_uri(copy) == f"sqlite:///{user_repo.resolve().as_posix()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(user_repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"))  # an old DVC
    assert tracking.store_root(copy) == user_repo.resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.default_tracking_uri(copy) == "http://127.0.0.1:5000"


def test_unreachable_server_gives_a_noop_run_quickly(
    closed_port_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port_url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # the user's own setting is kept
    caplog.set_level(logging.INFO, logger="vdsr.tracking")
    started = time.monotonic()
    run = tracking.start_run(repo_root=tmp_path, params=PARAMS, tags={"a": "b"})
    assert time.monotonic() - started < 5
    assert run.run_id is None
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == tracking.HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tracking is off" in warnings[0] and closed_port_url.rstrip("/") in warnings[0]

    artifact = tmp_path / "x.txt"
    artifact.write_text("x")
    run.log_metrics({"loss": 1.0, "psnr": 30.0}, step=1)
    run.log_metrics({"loss": 0.5, "psnr": 31.0}, step=2)
    run.log_artifact(artifact)
    run.log_model(torch.nn.Conv2d(1, 1, 3), np.zeros((2, 1, 8, 8), np.float32))
    run.set_tags({"k": "v"})
    run.end()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # the first warning, then the summary at the end
    assert "4 metric values" in warnings[1] and "artifact" in warnings[1] and "model" in warnings[1]
    assert not list(tmp_path.glob("mlflow.db"))


def test_silent_server_is_given_up_within_the_probe_timeout(
    silent_server_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", silent_server_url)
    monkeypatch.setattr(tracking, "PROBE_TIMEOUT_S", 1.0)
    started = time.monotonic()
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={})
    assert time.monotonic() - started < 4
    assert run.run_id is None and "probe timeout 1 s" in run.reason


def test_server_lost_mid_run_warns_once_and_stops_logging(
    tmp_path: Path, closed_port_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={})
    run_id = run.run_id
    run.log_metrics({"loss": 1.0}, step=1)
    tracking.bound_http_retries()
    run.tracking_uri = closed_port_url  # as if the store went away
    caplog.set_level(logging.WARNING, logger="vdsr.tracking")
    started = time.monotonic()
    run.log_metrics({"loss": 0.5}, step=2)
    run.log_metrics({"loss": 0.25}, step=3)
    assert time.monotonic() - started < 15
    assert run.run_id is None
    run.end()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("tracking is off" in m for m in messages) == 1
    assert "2 metric values" in messages[-1]
    import mlflow

    assert mlflow.active_run() is None  # let go of (marking it FAILED on the lost store fails, bounded)
    assert MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id, "loss")[0].value == 1.0


def test_missing_artifact_is_skipped_but_tracking_stays_on(tmp_path: Path) -> None:
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={})
    run.log_artifact(tmp_path / "nope.txt")
    assert run.run_id is not None
    run.log_metrics({"x": 1.0})
    run.end()
    assert MlflowClient(tracking.reachable_uri(run.tracking_uri, tmp_path)).get_run(run.run_id).data.metrics == {"x": 1.0}


def test_invalid_metric_names_are_skipped_but_tracking_stays_on(tmp_path: Path) -> None:
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={})
    run.log_metrics({"val psnr (x2)": 30.0, "/abs": 1.0, "eval/Set5/x2/psnr": 31.0})
    assert run.run_id is not None
    run.end()
    assert MlflowClient(tracking.reachable_uri(run.tracking_uri, tmp_path)).get_run(run.run_id).data.metrics == {"eval/Set5/x2/psnr": 31.0}
    assert run._not_logged == {"metric values (bad names)": 2}


def test_resume_without_a_run_or_a_store_is_a_noop(tmp_path: Path) -> None:
    assert tracking.resume_run(repo_root=tmp_path, run_id=None).run_id is None
    run = tracking.resume_run(repo_root=tmp_path, run_id="0" * 32)
    assert run.run_id is None and "no MLflow store" in run.reason
    assert not (tmp_path / "mlflow.db").exists()  # no empty store is created


def test_concurrent_first_runs_share_one_new_store(tmp_path: Path) -> None:
    """Two processes creating the same fresh SQLite store: both runs land (no "already exists")."""
    code = (
        "import sys; from pathlib import Path; from vdsr import tracking\n"
        "run = tracking.start_run(repo_root=Path(sys.argv[1]), params={'p': 1}, tags={})\n"
        "run.end(); print(run.run_id)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=with_faulthandler(env),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(2)
    ]
    try:
        outputs = [proc.communicate(timeout=240) for proc in procs]
    except subprocess.TimeoutExpired:
        running = [proc for proc in procs if proc.poll() is None]
        for proc in running:
            abort_with_stacks(proc)
        stacks = "\n".join(proc.communicate(timeout=10)[1][-6000:] for proc in running)
        raise AssertionError(f"a first run ran over 240 s; stacks (faulthandler):\n{stacks}") from None
    run_ids = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert all(len(run_id) == 32 for run_id in run_ids), outputs
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert {client.get_run(run_id).info.status for run_id in run_ids} == {"FINISHED"}


def test_reproducibility_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True, timeout=60)
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n"
        "  download:\n    cmd: python stages/download.py\n    deps:\n"
        "    - path: data/manifest.json\n      hash: md5\n      md5: 1111\n"
        "    - path: stages/download.py\n      hash: md5\n      md5: 2222\n"
        "    outs:\n    - path: data/raw\n      hash: md5\n      md5: 3333.dir\n"
        "  prepare:\n    cmd: python stages/prepare.py\n    outs:\n"
        "    - path: data/prepared\n      hash: md5\n      md5: 4444.dir\n"
        "  train:\n    cmd: python stages/train.py\n    outs:\n"
        "    - path: models/model.pt\n      hash: md5\n      md5: 5555\n"
    )
    subprocess.run([*git, "add", "dvc.lock"], check=True, timeout=60)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True, timeout=60)
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lark")

    tags = provenance.reproducibility_tags(tmp_path)
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] == "false"
    assert tags["dvc.exp_name"] == "brisk-lark"
    assert {k: v for k, v in tags.items() if k.startswith("dvc.md5.")} == {
        "dvc.md5.data/manifest.json": "1111", "dvc.md5.data/raw": "3333.dir", "dvc.md5.data/prepared": "4444.dir"
    }
    assert tags["torch.version"] == torch.__version__ and "device" in tags
    with open(tmp_path / "dvc.lock", "a") as lock:
        lock.write("\n")
    tags = provenance.reproducibility_tags(tmp_path)
    assert tags["git.dirty"] == "true" and tags["git.changed"] == "dvc.lock"


def test_flatten_params() -> None:
    assert tracking.flatten_params({"a": {"b": {"c": 1}, "d": [2, 3]}, "e": True}) == {
        "a.b.c": "1", "a.d": "[2, 3]", "e": "True"
    }


def test_public_uri_takes_out_credentials_and_machine_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    cases = {
        "http://alice:s3cret-t0ken@mlflow.example.org:5000/": "http://mlflow.example.org:5000/",
        "https://t0ken-only@mlflow.example.org/x?token=abc&workspace=1": "https://mlflow.example.org/x?token=***&workspace=1",
        "postgresql+psycopg2://bob:pw%40db@db.example.org:5432/mlflow": "postgresql+psycopg2://db.example.org:5432/mlflow",
        f"sqlite:///{repo.as_posix()}/mlflow.db": "sqlite:///mlflow.db",
        f"sqlite:///{repo.as_posix()}/sub/m.db?timeout=20": "sqlite:///sub/m.db?timeout=20",
        f"sqlite:///{tmp_path.as_posix()}/elsewhere.db": "sqlite:///<outside the repository>/elsewhere.db",
        "sqlite:///mlflow.db": "sqlite:///mlflow.db",
        (repo / "mlruns").as_uri(): "file:mlruns",
        "databricks://profile": "databricks://profile",
    }
    for uri, public in cases.items():
        assert tracking.public_uri(uri, repo) == public, uri
    monkeypatch.setenv("DVC_ROOT", str(repo))  # an experiment copy: paths relative to the user's repository
    assert tracking.public_uri(f"sqlite:///{repo.as_posix()}/mlflow.db", repo / ".dvc/tmp/exps/tmp1") == "sqlite:///mlflow.db"
    assert tracking.reachable_uri("sqlite:///mlflow.db", repo / ".dvc/tmp/exps/tmp1") == f"sqlite:///{repo.resolve().as_posix()}/mlflow.db"
    assert tracking.reachable_uri("file:mlruns", repo) == (repo.resolve() / "mlruns").as_uri()
    with pytest.raises(ValueError, match="outside the repository"):
        tracking.reachable_uri("sqlite:///<outside the repository>/elsewhere.db", repo)
    message = "API request to http://alice:s3cret-t0ken@127.0.0.1:5/api/2.0/mlflow/runs/get failed"
    assert tracking.redact(message) == "API request to http://127.0.0.1:5/api/2.0/mlflow/runs/get failed"


def test_credentials_in_the_uri_go_to_mlflows_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:s3cret%2Ft0ken@127.0.0.1:5000")
    caplog.set_level(logging.INFO, logger="vdsr.tracking")
    assert tracking.default_tracking_uri(tmp_path) == "http://127.0.0.1:5000"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "s3cret/t0ken")
    assert "s3cret" not in caplog.text
    run = tracking.Run(None, "http://t0ken-only@127.0.0.1:1", reason="failed: http://t0ken-only@127.0.0.1:1/api")
    assert run.tracking_uri == "http://127.0.0.1:1" and "t0ken" not in run.reason and "t0ken" not in caplog.text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://t0ken-only@127.0.0.1:5000")  # a lone token stays in the URI
    assert tracking.default_tracking_uri(tmp_path) == "http://t0ken-only@127.0.0.1:5000"
    assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # MLflow's "View run at" would show it


def test_logged_model_holds_no_machine_path(tmp_path: Path) -> None:
    """MLflow writes the local store's folder into MLmodel (``artifact_path: file:///...``) and
    torch.export keeps each node's source location (torch in the venv, vdsr/models.py): neither
    may be in a logged model, which is shared like any file. The model still loads and runs."""
    import zipfile

    import mlflow
    import mlflow.pytorch

    from vdsr.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig("vdsr", 3, 4)).eval()
    repo = tmp_path / "repo"
    with tracking.start_run(repo_root=repo, params={}, tags={}) as run:
        run.log_model(model, np.random.default_rng(0).random((2, 1, 16, 16), dtype=np.float32))
    assert not run._not_logged
    [folder] = [p.parent for p in (repo / "mlartifacts").rglob("MLmodel")]
    paths = {str(Path(__file__).resolve().parents[1]), sys.prefix, str(Path(torch.__file__).parents[1]),
             str(Path(mlflow.__file__).parent), str(tmp_path), str(tmp_path.resolve())}
    found = []
    for path in (p for p in folder.rglob("*") if p.is_file()):
        parts = [(path.name, path.read_bytes())]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                parts += [(f"{path.name}!{name}", archive.read(name)) for name in archive.namelist()]
        found += [(name, p) for name, data in parts for p in paths if p.encode() in data]
    assert found == []
    import yaml

    assert "artifact_path" not in yaml.safe_load((folder / "MLmodel").read_text())  # the store's folder
    mlflow.set_tracking_uri(tracking.default_tracking_uri(repo))
    loaded = mlflow.pytorch.load_model(f"runs:/{run.run_id}/model")
    x = torch.rand(3, 1, 21, 17)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_run_names_start_with_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracking.run_name("vdsr") == "vdsr"  # the workspace's training
    assert tracking.run_name("srcnn", "report") == "srcnn report"
    monkeypatch.setenv("DVC_EXP_NAME", "smoke-1202")
    assert tracking.run_name("vdsr") == "vdsr smoke-1202"
    assert tracking.run_name("srcnn", "evaluate") == "srcnn smoke-1202 evaluate"
    assert tracking.run_name("vdsr", experiment="lr-small") == "vdsr lr-small"


def test_run_summaries_read_the_store_that_mlflow_tracking_uri_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(elsewhere / 'runs.db').as_posix()}")
    run = tracking.start_run(repo_root=tmp_path, params={}, tags={"git.commit": "abc", "other": "x"},
                             run_name="vdsr test")
    run.end()
    found = tracking.run_summaries(tmp_path, [run.run_id, "0" * 32])
    assert list(found) == [run.run_id]  # the unknown id is left out
    summary = found[run.run_id]
    assert summary["name"] == "vdsr test" and summary["status"] == "FINISHED"
    assert summary["git.commit"] == "abc" and "other" not in summary
    assert summary["end"] >= summary["start"] > 0
    assert not (tmp_path / "mlflow.db").exists()  # the repository's default store is not read or created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(tmp_path / 'none.db').as_posix()}")
    assert tracking.run_summaries(tmp_path, [run.run_id]) == {}  # no store there: nothing, and none created
    assert not (tmp_path / "none.db").exists()

"""Credentials and machine paths: a real ``mlflow server --app-name basic-auth`` on 127.0.0.1 (the
shared-server recipe of docs/mlflow.md), the tiny pipeline logging to it with the password in the URI, and
every file, log line and logged model checked for the password and for this machine's paths."""

from __future__ import annotations

import re
import secrets
import sys
import urllib.error
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, run_checked
from mlflow_server import MlflowServer, Streamed, rest

pytest_plugins = ["mlflow_server"]  # the tiny_repo fixture

REPRO_TIMEOUT_S = 600  # the tiny pipeline takes ~20-60 s; the bound only stops a hung run


class AuthServer:
    def __init__(self, server: MlflowServer, password: str) -> None:
        self.server, self.url, self.password = server, server.url, password

    @property
    def admin(self) -> tuple[str, str]:
        return ("admin", self.password)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory):
    """One basic-auth server for the module (it takes ~15-60 s to start): user admin, a fresh password."""
    password = secrets.token_urlsafe(18)
    server = MlflowServer(tmp_path_factory.mktemp("auth") / "mlflow-server", admin_password=password)
    print(f"mlflow server --app-name basic-auth {server.url} healthy in {server.start_s:.1f} s")
    yield AuthServer(server, password)
    server.stop()


@pytest.fixture
def no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_basic_auth_server_refuses_requests_without_credentials_and_takes_them_from_the_environment(
    auth_server: AuthServer, tmp_path: Path, no_tracking_env: pytest.MonkeyPatch
) -> None:
    from vdsr import tracking

    url = auth_server.url
    for auth in (None, ("admin", "not-the-password")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            rest(url, "experiments/search", {"max_results": 1}, auth=auth)
        assert refused.value.code == 401, auth
    assert rest(url, "experiments/search", {"max_results": 1}, auth=auth_server.admin) is not None

    no_tracking_env.setenv("MLFLOW_TRACKING_URI", url)
    anonymous = tracking.start_run(repo_root=tmp_path, params={"p": 1}, tags={})
    assert anonymous.run_id is None and "401" in anonymous.reason, anonymous.reason
    anonymous.end()

    no_tracking_env.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    no_tracking_env.setenv("MLFLOW_TRACKING_PASSWORD", auth_server.password)
    with tracking.start_run(repo_root=tmp_path, params={"p": 1}, tags={"who": "admin"}) as run:
        run.log_metrics({"x": 1.0}, step=1)
    logged = rest(url, "runs/get", {"run_id": run.run_id}, auth=auth_server.admin)["run"]
    assert logged["info"]["status"] == "FINISHED" and logged["data"]["metrics"][0]["value"] == 1.0

    # A teammate's account, made as docs/mlflow.md says; default_permission = EDIT lets her log to
    # the experiment that admin created.
    import mlflow.server

    alice = secrets.token_urlsafe(12)
    mlflow.server.get_app_client("basic-auth", tracking_uri=url).create_user("alice", alice)
    no_tracking_env.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    no_tracking_env.setenv("MLFLOW_TRACKING_PASSWORD", alice)
    with tracking.start_run(repo_root=tmp_path, params={"p": 2}, tags={"who": "alice"}) as theirs:
        theirs.log_metrics({"x": 2.0}, step=1)
    assert theirs.run_id is not None, theirs.reason
    mine = rest(url, "runs/get", {"run_id": run.run_id}, auth=auth_server.admin)["run"]
    logged = rest(url, "runs/get", {"run_id": theirs.run_id}, auth=("alice", alice))["run"]
    assert logged["info"]["experiment_id"] == mine["info"]["experiment_id"]
    assert logged["info"]["status"] == "FINISHED" and logged["data"]["metrics"][0]["value"] == 2.0


def test_documented_recipe_binds_loopback_and_keeps_credentials_out_of_uris() -> None:
    page = (REPO_ROOT / "docs" / "mlflow.md").read_text()
    section = page[page.index("## A shared tracking server"):page.index("## When the server is down")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
    server = next(block for block in blocks if "mlflow server" in block)
    assert "--app-name basic-auth" in server and "--host 127.0.0.1" in server and "0.0.0.0" not in server, server
    assert "MLFLOW_TRACKING_USERNAME" in section and "MLFLOW_TRACKING_PASSWORD" in section
    for block in blocks:  # no recipe puts a user and password into a URI
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", block), block


def machine_paths(*more: Path) -> list[str]:
    """This machine's absolute paths that must not be in a committed file or a logged model."""
    import mlflow

    paths = {str(REPO_ROOT), sys.prefix, str(Path(torch.__file__).parents[1]), str(Path(mlflow.__file__).parent),
             *(str(p) for p in more)}
    return sorted(paths)


def contents(path: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of a file and, for a zip archive (a .pt2, a torch file), of each member."""
    data = path.read_bytes()
    found = [(str(path), data)]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            found += [(f"{path}!{name}", archive.read(name)) for name in archive.namelist()]
    return found


def holding(files: list[Path], needles: list[str]) -> list[tuple[str, str]]:
    """(file or archive member, needle) for each needle found in each file."""
    return [(name, needle) for path in files for name, data in contents(path)
            for needle in needles if needle.encode() in data]


def test_credentials_in_the_uri_reach_no_file_log_line_or_logged_model(
    auth_server: AuthServer, tiny_repo, tmp_path: Path
) -> None:
    repo, env = tiny_repo()
    url, password = auth_server.url, auth_server.password
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    env["MLFLOW_TRACKING_URI"] = url.replace("http://", f"http://admin:{password}@") + "/"
    repro = Streamed(["dvc", "repro"], repo, env).check(REPRO_TIMEOUT_S)
    assert "tracking is off" not in repro.output and "not logged to MLflow" not in repro.output, repro.output[-6000:]

    # The credentials worked: the run is complete on the server, evaluation and report included.
    import json

    run_file = json.loads((repo / "models/vdsr.mlflow_run.json").read_text())
    run_id = run_file["run_id"]
    assert run_file == {"run_id": run_id, "started_run_id": run_id, "tracking_uri": f"{url}/"}
    results = json.loads((repo / "results/vdsr.json").read_text())["mlflow_run"]
    assert results == {**run_file, "training_run_id": run_id}
    run = rest(url, "runs/get", {"run_id": run_id}, auth=auth_server.admin)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert "eval/Set5/x2/psnr" in {m["key"] for m in run["data"]["metrics"]}
    assert "report/results.md" in list_artifacts_as(url, run_id, auth_server.admin)

    # No password in any log line, any file of the repository (.git and DVC's cache and logs too)
    # or of the server's folder (store, artifacts, logged model, server log).
    assert password not in repro.output
    everything = [p for root in (repo, auth_server.server.folder) for p in root.rglob("*")
                  if p.is_file() and not p.is_symlink()]
    assert holding(everything, [password]) == []

    # No machine path in what is committed (git ls-files after `git add -A`: dvc.lock, params,
    # models/*.mlflow_run.json, results/*.json, metrics, plots, reports) ...
    run_checked(["git", "add", "-A"], repo, env)
    committed = [repo / name for name in run_checked(["git", "ls-files"], repo, env).stdout.split()]
    assert {"models/vdsr.mlflow_run.json", "results/vdsr.json", "reports/results.md"} <= {
        p.relative_to(repo).as_posix() for p in committed}
    paths = machine_paths(repo, tmp_path, auth_server.server.folder)
    assert holding(committed, paths) == []
    # ... nor in the logged model: MLmodel, environment files and the torch.export graph.
    [model_dir] = [p.parent for p in (auth_server.server.folder / "artifacts").rglob("MLmodel")
                   if (p.parent / "data" / "model.pt2").is_file() and run_id in p.read_text()]
    model_files = [p for p in model_dir.rglob("*") if p.is_file()]
    assert {"MLmodel", "requirements.txt", "conda.yaml", "python_env.yaml"} <= {p.name for p in model_files}
    assert holding(model_files, paths) == []


def list_artifacts_as(url: str, run_id: str, auth: tuple[str, str], path: str = "") -> list[str]:
    query = {"run_id": run_id, **({"path": path} if path else {})}
    files: list[str] = []
    for entry in rest(url, "artifacts/list", query, auth=auth).get("files", []):
        files += list_artifacts_as(url, run_id, auth, entry["path"]) if entry.get("is_dir") else [entry["path"]]
    return files

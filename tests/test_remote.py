"""Sharing data and models through a DVC remote: an S3-compatible server on 127.0.0.1 (moto).

One person runs the pipeline and pushes; a colleague clones the git repository, pulls, and gets
the same bytes without recomputing anything. The server is moto's standalone S3 (memory only),
started per test; DVC reaches it through ``dvc-s3`` with dummy credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import run_checked


BUCKET = "vdsr-team"
TINY = {
    "download": {"sets": ["Set5", "Set14"], "workers": 4},
    "prepare": {"train_sets": ["Set14"], "val_set": "Set5", "scales": [2], "downsizing": [1.0], "workers": 1},
    "baseline": {"sets": ["Set5"], "scales": [2]},
    "train": {"vdsr": {"depth": 3, "width": 4, "epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "device": "cpu"},
              "srcnn": None},  # one model: train@vdsr
}
SHARED = ["data/raw", "data/prepared", "models/vdsr.pt"]  # the cached outputs of download, prepare, train


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3_endpoint(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``(endpoint URL, environment)`` of a fresh moto S3 server on 127.0.0.1 holding an empty bucket."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    aws = tmp_path / "aws"  # no ~/.aws: the dummy keys below are the only credentials anyone sees
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(aws / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
    }
    log = open(tmp_path / "moto.log", "wb")  # noqa: SIM115 (closed at teardown)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {endpoint}: "
                                       f"{(tmp_path / 'moto.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield endpoint, env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def tree_sha256(root: Path, names: list[str]) -> dict[str, str]:
    """sha256 of every file under each of ``names`` (files or folders), by relative path."""
    digests = {}
    for name in names:
        path = root / name
        for file in sorted([path] if path.is_file() else path.rglob("*")):
            if file.is_file():
                digests[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digests


def test_push_then_a_fresh_clone_pulls_identical_data_and_model(pipeline_repo, s3_endpoint, tmp_path) -> None:
    endpoint, aws_env = s3_endpoint
    repo, env = pipeline_repo(TINY)
    env = {**env, **{k: v for k, v in aws_env.items() if k.startswith("AWS_")}}

    # The remote goes into .dvc/config, committed with the code: every clone knows where data lives.
    run_checked(["dvc", "remote", "add", "--default", "team", f"s3://{BUCKET}/dvcstore"], repo, env)
    run_checked(["dvc", "remote", "modify", "team", "endpointurl", endpoint], repo, env)
    run_checked(["dvc", "repro", "prepare", "baseline", "train"], repo, env, timeout=600)
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-qm", "tiny run"], repo, env)
    produced = tree_sha256(repo, SHARED)
    assert len(produced) == 19 + 2 + 1  # Set5 + Set14 images, train.h5 + val.h5, vdsr.pt

    pushed = run_checked(["dvc", "push"], repo, env)
    assert "files pushed" in pushed.stdout, pushed.stdout
    assert "Everything is up to date" in run_checked(["dvc", "push"], repo, env).stdout  # nothing twice

    # A colleague: a clone has the code, params, dvc.lock and the remote's address, but no data.
    clone = tmp_path / "clone"
    run_checked(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "data/raw").exists() and not (clone / ".dvc/cache").exists()
    pulled = run_checked(["dvc", "pull"], clone, env)
    assert "files fetched" in pulled.stdout or "files added" in pulled.stdout, pulled.stdout
    assert tree_sha256(clone, SHARED) == produced  # byte for byte

    # The pulled outputs match dvc.lock: the data stages have nothing to redo.
    repro = run_checked(["dvc", "repro", "prepare", "baseline"], clone, env)
    assert "Running stage" not in repro.stdout, repro.stdout
    status = run_checked(["dvc", "status", "--json", "download", "prepare", "baseline"], clone, env)
    assert json.loads(status.stdout) == {}
    # Only cached outputs travel through the remote; the metrics are small files in git.
    assert (clone / "metrics/bicubic.json").read_text() == (repo / "metrics/bicubic.json").read_text()

    # Losing the local cache and outputs is no loss either: pull brings them back.
    for name in (".dvc/cache", "data/raw", "data/prepared"):
        shutil.rmtree(repo / name)
    (repo / "models/vdsr.pt").unlink()
    run_checked(["dvc", "pull"], repo, env)
    assert tree_sha256(repo, SHARED) == produced


def test_experiments_travel_through_git_and_the_remote(pipeline_repo, s3_endpoint, tmp_path) -> None:
    """``dvc exp push`` sends an experiment's git ref to a git remote and its outputs to the DVC remote."""
    endpoint, aws_env = s3_endpoint
    repo, env = pipeline_repo({key: TINY[key] for key in ("download", "prepare", "baseline")})
    env = {**env, **{k: v for k, v in aws_env.items() if k.startswith("AWS_")}}
    origin = tmp_path / "origin.git"
    run_checked(["git", "init", "-q", "--bare", "-b", "main", str(origin)], tmp_path, env)
    run_checked(["git", "remote", "add", "origin", str(origin)], repo, env)
    run_checked(["dvc", "remote", "add", "--default", "team", f"s3://{BUCKET}/dvcstore"], repo, env)
    run_checked(["dvc", "remote", "modify", "team", "endpointurl", endpoint], repo, env)
    run_checked(["dvc", "repro", "prepare", "baseline"], repo, env)
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-qm", "baseline"], repo, env)
    run_checked(["git", "push", "-q", "origin", "main"], repo, env)
    run_checked(["dvc", "push"], repo, env)
    main_prepared = tree_sha256(repo, ["data/prepared"])

    run_checked(["dvc", "exp", "run", "-n", "scales-2-4", "-S", "prepare.scales=[2,4]", "prepare"], repo, env)
    exp_prepared = tree_sha256(repo, ["data/prepared"])
    assert exp_prepared != main_prepared
    pushed = run_checked(["dvc", "exp", "push", "origin", "scales-2-4"], repo, env)
    assert "scales-2-4" in pushed.stdout, pushed.stdout

    clone = tmp_path / "clone"
    run_checked(["git", "clone", "-q", str(origin), str(clone)], tmp_path, env)
    run_checked(["dvc", "exp", "pull", "origin", "scales-2-4"], clone, env)
    shown = json.loads(run_checked(["dvc", "exp", "show", "--json"], clone, env).stdout)
    assert "scales-2-4" in json.dumps(shown)
    # A git branch from the experiment, then its outputs from the cache `dvc exp pull` filled.
    # (`dvc exp apply` would also check out models/vdsr.pt, which this data-only pipeline never made.)
    run_checked(["dvc", "exp", "branch", "scales-2-4", "scales-2-4"], clone, env)
    run_checked(["git", "checkout", "-q", "scales-2-4"], clone, env)
    run_checked(["dvc", "checkout", "prepare"], clone, env)
    assert yaml.safe_load((clone / "params.yaml").read_text())["prepare"]["scales"] == [2, 4]
    assert tree_sha256(clone, ["data/prepared"]) == exp_prepared  # the experiment's outputs, from the remote

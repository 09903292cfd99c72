"""Untrusted files: model files that would run code when unpickled, symlinks that lead out of the tree.

A model or checkpoint file may come from a colleague, a DVC remote or the internet. ``torch.load``
without ``weights_only=True`` unpickles it, and unpickling can call any function: the payloads
below would create a marker file. Every reader must refuse them before anything runs. Symlinks
placed in the data or output folders must be replaced, never written through.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO_ROOT, run_checked, run_child, set_params
from vdsr.config import _UniqueKeyLoader
from vdsr.models import ModelConfig, ModelFileError, build_model, load_model, save_model

# --- model files that run code ------------------------------------------------------------------


class Payload:
    """Unpickling this calls ``exec``, which writes ``marker``: what an attacker's file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('code ran')",)


def malicious_file(kind: str, path: Path, marker: Path) -> Path:
    """A file that runs ``Payload`` when loaded without ``weights_only``, in one of three containers."""
    if kind == "raw-pickle":  # what `pickle.dump(model, f)` writes
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    elif kind == "torch-zip":  # a real model file with one poisoned metadata entry, torch.save's format
        good = tmp_model(path.parent / "good.pt")
        payload = torch.load(good, weights_only=True)
        payload["meta"]["note"] = Payload(marker)
        torch.save(payload, path)
    elif kind == "torch-legacy":  # torch.save's pre-1.6 format
        torch.save({"format": "vdsr-model", "state_dict": Payload(marker)}, path, _use_new_zipfile_serialization=False)
    return path


def tmp_model(path: Path) -> Path:
    torch.manual_seed(0)
    save_model(path, build_model(ModelConfig("vdsr", 3, 4)), ModelConfig("vdsr", 3, 4), {"epochs": 1})
    return path


KINDS = ["raw-pickle", "torch-zip", "torch-legacy"]


@pytest.mark.parametrize("kind", KINDS)
def test_payloads_are_live(tmp_path: Path, kind: str) -> None:
    """The control: loaded the unsafe way, each file does run its code."""
    marker = tmp_path / "ran"
    path = malicious_file(kind, tmp_path / "evil.pt", marker)
    if kind == "raw-pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)  # deliberately unsafe: proves the payload is live
    assert marker.read_text() == "code ran"


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_refuses_code_in_a_model_file(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    path = malicious_file(kind, tmp_path / "evil.pt", marker)
    with pytest.raises(ModelFileError, match=r"evil\.pt: not a VDSR model file") as caught:
        load_model(path)
    assert "weights_only" in str(caught.value) or "Unsupported" in str(caught.value)
    assert not marker.exists()


def test_checkpoint_loader_refuses_code(tmp_path: Path) -> None:
    """A persisted checkpoints/last.pt is read back by the next training run."""
    from vdsr.checkpoints import CheckpointError, load_checkpoint

    marker = tmp_path / "ran"
    path = malicious_file("torch-zip", tmp_path / "last.pt", marker)
    with pytest.raises(CheckpointError, match=r"last\.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def vdsr_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_child([sys.executable, "-m", "vdsr.cli", *args], cwd=cwd, timeout=120)


@pytest.mark.parametrize("kind", ["raw-pickle", "torch-zip"])
def test_cli_refuses_code_in_a_model_file(tmp_path: Path, set5_dir: Path, kind: str) -> None:
    marker = tmp_path / "ran"
    evil = malicious_file(kind, tmp_path / "evil.pt", marker)
    image = tmp_path / "in.png"
    Image.open(set5_dir / "head.png").crop((0, 0, 48, 48)).save(image)

    evaluate = vdsr_cli("evaluate", "--images", str(set5_dir), "--scales", "2", "--model", str(evil),
                        "--device", "cpu", "--json", str(tmp_path / "out.json"), cwd=tmp_path)
    upscale = vdsr_cli("upscale", str(image), "--scale", "2", "--model", str(evil), "--device", "cpu",
                       "-o", str(tmp_path / "out"), cwd=tmp_path)
    for command, result in (("evaluate", evaluate), ("upscale", upscale)):
        assert result.returncode != 0, result.stderr
        assert f"vdsr {command}: error: {evil}: not a VDSR model file" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out").exists()


# --- the code itself ----------------------------------------------------------------------------


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO_ROOT / folder).rglob("*.py"))


def calls(path: Path) -> list[tuple[str, ast.Call]]:
    """``(dotted name of the called function, call node)`` for every call in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            found.append((ast.unparse(node.func), node))
    return found


def keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ast.unparse(kw.value)
    return None


def test_every_torch_load_is_weights_only() -> None:
    seen = 0
    for path in python_files("vdsr", "stages", "bench"):
        for name, call in calls(path):
            if name == "torch.load":
                seen += 1
                assert keyword(call, "weights_only") is True, f"{path}:{call.lineno}: {ast.unparse(call)}"
    assert seen >= 2  # vdsr.models.load_model and vdsr.checkpoints.load_checkpoint at least


def test_no_shell_no_pickle_no_eval_in_the_code() -> None:
    unsafe = {"os.system", "os.popen", "eval", "exec", "pickle.load", "pickle.loads", "subprocess.getoutput",
              "subprocess.getstatusoutput"}
    problems = []
    for path in python_files("vdsr", "stages", "bench", "tests"):
        for name, call in calls(path):
            where = f"{path.relative_to(REPO_ROOT)}:{call.lineno}: {ast.unparse(call)[:80]}"
            if keyword(call, "shell") not in (None, False):
                problems.append(where)
            if keyword(call, "allow_pickle") not in (None, False):
                problems.append(where)
            if name in unsafe and path.parent.name != "tests":
                problems.append(where)
            if name == "yaml.load" and keyword(call, "Loader") not in ("_UniqueKeyLoader", "yaml.SafeLoader"):
                problems.append(where)
    assert problems == []
    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)  # params.yaml: no python/object tags


def test_params_yaml_cannot_construct_objects(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / "params.yaml").write_text(
        f"prepare: !!python/object/apply:builtins.exec [\"open({str(marker)!r}, 'w')\"]\n"
    )
    result = run_child([sys.executable, str(REPO_ROOT / "stages/prepare.py")], cwd=tmp_path, timeout=60)
    assert result.returncode == 1 and "prepare: error: params.yaml: not valid YAML" in result.stderr
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply" in result.stderr
    assert not marker.exists()


# --- symlinks -----------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download_workdir(root: Path) -> Path:
    (root / "data/raw/Set5").mkdir(parents=True)
    shutil.copyfile(REPO_ROOT / "data/manifest.json", root / "data/manifest.json")
    (root / "params.yaml").write_text("download:\n  sets: [Set5]\n  workers: 2\n  retries: 0\n  timeout_s: 5\n")
    return root


def run_download(work: Path, mirror: Path) -> subprocess.CompletedProcess:
    return run_child([sys.executable, str(REPO_ROOT / "stages/download.py")], cwd=work,
                     env={**os.environ, "VDSR_DATA_MIRROR": str(mirror)}, timeout=60)


def test_download_refuses_a_file_symlink_leading_out(tmp_path: Path, shared_datasets: Path) -> None:
    work, outside = download_workdir(tmp_path / "work"), tmp_path / "outside.txt"
    outside.write_text("not the bird")
    (work / "data/raw/Set5/bird.png").symlink_to(outside)

    result = run_download(work, shared_datasets)
    assert result.returncode == 1
    assert f"download: error: refusing to write data/raw/Set5/bird.png: it resolves to {outside}" in result.stderr
    assert "Traceback" not in result.stderr
    assert outside.read_text() == "not the bird"  # never opened for writing
    assert (work / "data/raw/Set5/bird.png").is_symlink()


def test_download_removes_a_folder_symlink_not_its_target(tmp_path: Path, shared_datasets: Path) -> None:
    work, outside = download_workdir(tmp_path / "work"), tmp_path / "precious"
    outside.mkdir()
    (outside / "a.txt").write_text("keep me")
    (work / "data/raw/T91").symlink_to(outside, target_is_directory=True)  # a set that is not selected

    result = run_download(work, shared_datasets)
    assert result.returncode == 0, result.stderr
    assert "removed 1 stray" in result.stderr
    assert not (work / "data/raw/T91").exists() and not (work / "data/raw/T91").is_symlink()
    assert (outside / "a.txt").read_text() == "keep me"  # the link went, not what it pointed to


def test_outputs_linked_into_the_dvc_cache_are_replaced_not_overwritten(pipeline_repo) -> None:
    """With ``cache.type symlink`` every output is a link into .dvc/cache; a stage run by hand must
    not write through it, or it would corrupt the cached version that other commits point to."""
    repo, env = pipeline_repo({
        "download": {"sets": ["Set5"], "workers": 4},
        "prepare": {"train_sets": ["Set5"], "val_set": "Set5", "scales": [2], "downsizing": [1.0], "workers": 1},
        "baseline": {"sets": ["Set5"], "scales": [2]},
    })
    run_checked(["dvc", "config", "cache.type", "symlink"], repo, env)
    run_checked(["dvc", "repro", "prepare"], repo, env)
    train = repo / "data/prepared/train.h5"
    assert train.is_symlink()
    cached = train.resolve()
    assert cached.is_relative_to((repo / ".dvc/cache").resolve())
    assert hashlib.md5(cached.read_bytes()).hexdigest() == cached.parent.name + cached.name  # DVC's name

    set_params(repo / "params.yaml", {"prepare": {"scales": [3]}})
    result = run_child([sys.executable, "stages/prepare.py"], cwd=repo, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not train.is_symlink()  # a new file in its place
    assert hashlib.md5(cached.read_bytes()).hexdigest() == cached.parent.name + cached.name  # cache intact
    assert sha256(cached) != sha256(train)

    # Back to the committed params: DVC links the cached build in again and finds nothing to redo.
    set_params(repo / "params.yaml", {"prepare": {"scales": [2]}})
    run_checked(["dvc", "checkout", "--force", "prepare"], repo, env)
    assert train.resolve() == cached
    assert json.loads(run_checked(["dvc", "status", "--json", "prepare"], repo, env).stdout) == {}

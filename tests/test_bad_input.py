"""Bad input to the stage scripts: damaged images, a tampered mirror, empty sets, bad params.yaml.

Each stage runs as its own process in a folder laid out like the repository. Every case must end
with exit status 1, one ``<stage>: error: ...`` line naming the file or key and what was expected,
no traceback, and nothing written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, png_header_only, run_child, set_params, stage_workdir

SMALL = {
    "download": {"sets": ["Set5"], "workers": 2, "retries": 0, "timeout_s": 5},
    "prepare": {"train_sets": ["Set14"], "val_set": "Set5", "scales": [2], "downsizing": [1.0], "workers": 2},
    "baseline": {"sets": ["Set5"], "scales": [2]},
    "evaluate": {"sets": ["Set5"], "scales": [2]},
}


@pytest.fixture
def workdir(tmp_path: Path, shared_datasets: Path) -> Path:
    """params.yaml (the project's, made small), data/manifest.json and data/raw/{Set5,Set14}."""
    return stage_workdir(tmp_path / "work", shared_datasets, SMALL)


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: sha256 of files, "dir" for folders."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def run_stage(stage: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    model = ["vdsr"] if stage in ("train", "evaluate") else []  # train@vdsr, evaluate@vdsr
    return run_child([sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py"), *model], cwd=cwd, env=env, timeout=120)


def assert_refused(result: subprocess.CompletedProcess, stage: str, message: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert f"{stage}: error: {message}" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def assert_nothing_written(root: Path, before: dict[str, str]) -> None:
    """Only empty output folders may have appeared (created before the first file is opened)."""
    after = snapshot(root)
    new = {name: kind for name, kind in after.items() if name not in before}
    assert all(kind == "dir" for kind in new.values()), new
    assert {name: after[name] for name in before} == before


# --- damaged data -------------------------------------------------------------------------------


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda good: good[: len(good) // 3],
    "random-bytes": lambda good: random.Random(0).randbytes(len(good)),
    "empty": lambda good: b"",
    "text": lambda good: b"<html>404 Not Found</html>\n",  # what a bad mirror may serve under the name
    "bomb-header": lambda good: png_header_only(30000, 30000),  # 900 Mpixel claimed in 60 bytes
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_prepare_names_a_damaged_training_image(workdir: Path, damage: str) -> None:
    victim = workdir / "data/raw/Set14/comic.png"
    victim.write_bytes(DAMAGES[damage](victim.read_bytes()))
    before = snapshot(workdir)
    result = run_stage("prepare", workdir)  # workers: 2, so the error crosses the process pool
    reason = "too large to read" if damage == "bomb-header" else "not a readable image"
    assert_refused(result, "prepare", f"data/raw/Set14/comic.png: {reason}")
    assert_nothing_written(workdir, before)


@pytest.mark.parametrize("damage", ["truncated", "random-bytes"])
def test_baseline_names_a_damaged_test_image(workdir: Path, damage: str) -> None:
    victim = workdir / "data/raw/Set5/bird.png"
    victim.write_bytes(DAMAGES[damage](victim.read_bytes()))
    before = snapshot(workdir)
    assert_refused(run_stage("baseline", workdir), "baseline", "data/raw/Set5/bird.png: not a readable image")
    assert_nothing_written(workdir, before)


def test_download_refuses_a_mirror_file_with_the_wrong_sha256(workdir: Path, shared_datasets: Path) -> None:
    """A local mirror folder in which one file differs by one byte from what the manifest pins."""
    manifest = json.loads((REPO_ROOT / "data/manifest.json").read_text())
    mirror = workdir.parent / "mirror"
    for entry in manifest["sets"]["Set5"]["files"]:
        (mirror / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_datasets / entry["path"], mirror / entry["path"])
    tampered = mirror / "data/set5/img_003.png"
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    shutil.rmtree(workdir / "data/raw")

    result = run_stage("download", workdir, env={**os.environ, "VDSR_DATA_MIRROR": str(mirror)})
    expected_sha = next(e["sha256"] for e in manifest["sets"]["Set5"]["files"] if e["name"] == "butterfly.png")
    assert_refused(result, "download", "1 of 5 file(s) failed")
    line = next(line for line in result.stderr.splitlines() if "Set5/butterfly.png" in line)
    assert "sha256 mismatch" in line and f"manifest {expected_sha}" in line
    assert f"({tampered.as_uri()})" in line
    # The four good files are in place; the bad one is nowhere, not even as a temporary file.
    assert sorted(p.name for p in (workdir / "data/raw").rglob("*") if p.is_file()) == [
        "baby.png", "bird.png", "head.png", "woman.png"]
    assert list((workdir / "data/raw").rglob(".*")) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({}, "data/raw/Set14: no image files (.png"),
        ({"README.txt": b"images go here"}, "data/raw/Set14: no image files (.png"),
        (None, "data/raw/Set14: not a folder of images"),
    ],
    ids=["empty-folder", "no-images", "no-folder"],
)
def test_prepare_refuses_an_empty_training_set(workdir: Path, content, message: str) -> None:
    shutil.rmtree(workdir / "data/raw/Set14")
    if content is not None:
        (workdir / "data/raw/Set14").mkdir()
        for name, data in content.items():
            (workdir / "data/raw/Set14" / name).write_bytes(data)
    before = snapshot(workdir)
    assert_refused(run_stage("prepare", workdir), "prepare", message)
    assert_nothing_written(workdir, before)


def small_image(path: Path, width: int, height: int) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)).save(path)


@pytest.mark.parametrize(
    ("where", "size", "params", "message"),
    [
        ("Set14", (50, 30), {},
         "data/raw/Set14/tiny.png: image is 50x30, smaller than a 41x41 patch (prepare.patch_size)"),
        # Big enough as it is, but the only down-sizing shrinks it below a patch: no patch at all.
        ("Set14", (60, 60), {"downsizing": [0.5]}, "empty training set: no 41x41 patch in 1 images"),
        ("Set5", (3, 3), {}, "data/raw/Set5/tiny.png: image is 3x3, too small to validate x2"),
    ],
    ids=["smaller-than-patch", "shrunk-below-patch", "tiny-validation-image"],
)
def test_prepare_refuses_images_too_small(workdir: Path, where: str, size, params: dict, message: str) -> None:
    for path in (workdir / "data/raw" / where).iterdir():
        path.unlink()
    small_image(workdir / "data/raw" / where / "tiny.png", *size)
    set_params(workdir / "params.yaml", {"prepare": params})
    before = snapshot(workdir)
    assert_refused(run_stage("prepare", workdir), "prepare", message)
    assert_nothing_written(workdir, before)


# --- params.yaml --------------------------------------------------------------------------------

Edit = Callable[[dict], None]


def drop(section: str, key: str) -> Edit:
    return lambda params: params[section].pop(key)


def put(section: str, key: str, value: object) -> Edit:
    return lambda params: params[section].__setitem__(key, value)


def put_model(key: str, value: object, model: str = "vdsr") -> Edit:
    return lambda params: params["train"][model].__setitem__(key, value)


PARAMS_CASES: list[tuple[str, str, Edit, str]] = [
    # download
    ("download", "unknown-key", put("download", "mirror", "x"),
     "download: unknown key(s) mirror; known keys: sets, workers, retries, timeout_s"),
    ("download", "missing-key", drop("download", "timeout_s"),
     "download.timeout_s: expected a value (the key is missing)"),
    ("download", "list-expected", put("download", "sets", "Set5"), "download.sets: expected a list, got 'Set5'"),
    ("download", "bool-not-int", put("download", "workers", True), "download.workers: expected an integer, got True"),
    ("download", "negative", put("download", "retries", -1), "download.retries: expected an integer >= 0, got -1"),
    ("download", "repeated-set", put("download", "sets", ["Set5", "Set5"]), "download.sets: expected no repeated set"),
    # prepare (scale 9 is in test_prepare.py)
    ("prepare", "typo-key", lambda p: p["prepare"].update(patchsize=p["prepare"].pop("patch_size")),
     "prepare: unknown key(s) patchsize"),
    ("prepare", "float-not-int", put("prepare", "patch_size", 41.5),
     "prepare.patch_size: expected an integer, got 41.5"),
    ("prepare", "scale-1", put("prepare", "scales", [1]), "prepare.scales[0]: expected 2, 3 or 4, got 1"),
    ("prepare", "string-scale", put("prepare", "scales", ["x2"]), "prepare.scales[0]: expected an integer, got 'x2'"),
    ("prepare", "upsizing", put("prepare", "downsizing", [1.5]),
     "prepare.downsizing[0]: expected a factor in [0.1, 1.0]"),
    ("prepare", "tiny-patch", put("prepare", "patch_size", 4), "prepare.patch_size: expected a patch side >= 8 pixels"),
    ("prepare", "stride-0", put("prepare", "stride", 0), "prepare.stride: expected a step >= 1 pixel, got 0"),
    ("prepare", "unknown-set", put("prepare", "val_set", "Set6"), "prepare.val_set: expected one of T91"),
    # baseline
    ("baseline", "unknown-key", put("baseline", "crop_border", 4), "baseline: unknown key(s) crop_border"),
    ("baseline", "scale-9", put("baseline", "scales", [9]), "baseline.scales[0]: expected 2, 3 or 4, got 9"),
    ("baseline", "no-sets", put("baseline", "sets", []), "baseline.sets: expected at least one set, got []"),
    ("baseline", "string-not-list", put("baseline", "scales", "2, 3"), "baseline.scales: expected a list, got '2, 3'"),
    # evaluate (scale 5 and a missing set folder are in test_evaluate_stage.py)
    ("evaluate", "unknown-key", put("evaluate", "model", "models/model.pt"), "evaluate: unknown key(s) model"),
    ("evaluate", "scale-1", put("evaluate", "scales", [1]), "evaluate.scales[0]: expected 2, 3 or 4, got 1"),
    # train (the ranges of every key are checked in-process in test_train.py; here: the stage process)
    ("train", "unknown-key", put_model("warmup_epochs", 5), "train.vdsr: unknown key(s) warmup_epochs"),
    ("train", "negative-lr", put_model("lr", -0.1), "train.vdsr.lr: expected a number > 0, got -0.1"),
    ("train", "unknown-model", put_model("model", "edsr"),
     "train.vdsr.model: expected one of 'vdsr', 'srcnn', got 'edsr'"),
    ("train", "no-such-section", lambda params: params["train"].pop("vdsr"),
     "train: expected a section 'vdsr' (sections: srcnn)"),
]
STAGES = ["download", "prepare", "baseline", "evaluate", "train"]


@pytest.mark.parametrize(("stage", "case", "edit", "message"), PARAMS_CASES,
                         ids=[f"{stage}-{case}" for stage, case, _, _ in PARAMS_CASES])
def test_stage_refuses_bad_params_before_any_work(workdir: Path, stage: str, case: str, edit: Edit,
                                                  message: str) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    edit(params)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = snapshot(workdir)
    assert_refused(run_stage(stage, workdir), stage, f"params.yaml: {message}")
    assert_nothing_written(workdir, before)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_refuses_a_missing_section(workdir: Path, stage: str) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    del params[stage]
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = snapshot(workdir)
    assert_refused(run_stage(stage, workdir), stage, f"params.yaml: section '{stage}' is missing")
    assert_nothing_written(workdir, before)


BROKEN_FILES = {
    "not-yaml": (b"prepare:\n  scales: [2, 3\n  stride: 41\n",
                 "params.yaml: not valid YAML: while parsing a flow sequence"),
    "not-a-mapping": (b"- download\n- prepare\n",
                      "params.yaml: expected a mapping of sections, got ['download', 'prepare']"),
    "not-utf8": (b"prepare:\n  val_set: Set\xff\n", "params.yaml: not valid YAML: unacceptable character #x00ff"),
}
# Every stage with a file that is not YAML; the other cases on the quick-starting stages only (the
# file is read by the same vdsr.config.load_params for all, train and evaluate start torch first).
BROKEN_CASES = [(stage, "not-yaml") for stage in STAGES] + [
    (stage, broken) for broken in ("not-a-mapping", "not-utf8") for stage in ("download", "prepare", "baseline")
]


@pytest.mark.parametrize(("stage", "broken"), BROKEN_CASES, ids=[f"{s}-{b}" for s, b in BROKEN_CASES])
def test_stage_refuses_a_broken_params_file(workdir: Path, stage: str, broken: str) -> None:
    content, message = BROKEN_FILES[broken]
    (workdir / "params.yaml").write_bytes(content)
    before = snapshot(workdir)
    assert_refused(run_stage(stage, workdir), stage, message)
    assert_nothing_written(workdir, before)


def test_repeated_key_is_refused_not_silently_overridden(workdir: Path) -> None:
    """PyYAML keeps the last of two equal keys; a stage must not train with a value nobody sees."""
    text = (workdir / "params.yaml").read_text()
    (workdir / "params.yaml").write_text(text.replace("  stride: 41\n", "  stride: 41\n  stride: 20\n"))
    before = snapshot(workdir)
    result = run_stage("prepare", workdir)
    assert_refused(result, "prepare", "params.yaml: not valid YAML: while reading a mapping")
    assert "found key 'stride' twice" in result.stderr and 'in "params.yaml", line' in result.stderr
    assert_nothing_written(workdir, before)


def test_missing_params_file(workdir: Path) -> None:
    (workdir / "params.yaml").unlink()
    before = snapshot(workdir)
    assert_refused(run_stage("prepare", workdir), "prepare", "params.yaml: file not found")
    assert_nothing_written(workdir, before)


def test_train_refuses_patches_smaller_than_the_receptive_field(workdir: Path) -> None:
    """prepare.patch_size 21 with the paper's 20 layers (receptive field 41): refused before loading."""
    from vdsr.images import list_images
    from vdsr.prepare import write_training_set, write_validation_set

    images = list_images(workdir / "data/raw/Set5")
    write_training_set(images, workdir / "data/prepared/train.h5", scales=[2], downsizing=[1.0], patch_size=21,
                       stride=21, workers=1)
    write_validation_set(images, workdir / "data/prepared/val.h5", scales=[2])
    set_params(workdir / "params.yaml", {"train": {"vdsr": {"model": "vdsr", "depth": 20}}})
    before = snapshot(workdir)
    assert_refused(run_stage("train", workdir), "train",
                   "train.vdsr.depth: expected a model whose receptive field (41 px) fits the 21 px patches")
    assert_nothing_written(workdir, before)


@pytest.mark.parametrize("stage", ["train", "evaluate"])
@pytest.mark.parametrize("argv", [[], ["vdsr", "srcnn"], ["../models"]])
def test_model_stages_need_one_section_name(workdir: Path, stage: str, argv: list[str]) -> None:
    before = snapshot(workdir)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py"), *argv], cwd=workdir,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and f"{stage}: error: usage: python stages/{stage}.py <name of a train section>" \
        in result.stderr, result.stderr
    assert_nothing_written(workdir, before)


def test_exponent_floats_as_dvc_writes_them_are_numbers_and_quoted_ones_are_refused(tmp_path):
    from vdsr.config import ParamsError, load_params, load_section

    @dataclasses.dataclass(frozen=True)
    class Section:
        lr: float
        min_lr: float

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1e-3\n  min_lr: 1e-05\n")  # what `dvc exp run -S train.min_lr=1.0e-5` writes
    assert load_section(Section, "train", path) == Section(lr=1e-3, min_lr=1e-5)
    assert yaml.safe_load(path.read_text())["train"]["lr"] == "1e-3"  # PyYAML itself is unchanged (YAML 1.1)
    path.write_text("train:\n  lr: '1e-4'\n  min_lr: 0.0\n")
    with pytest.raises(ParamsError, match=r"train.lr: expected a number, got the string '1e-4'"):
        load_section(Section, "train", path)
    assert load_params(path)["train"]["min_lr"] == 0.0

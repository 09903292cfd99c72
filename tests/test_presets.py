"""Presets: every shipped preset names only real params keys, validates as a train section, and
prints `dvc exp run -S` options that survive the shell's word splitting; a bad preset (a value
the train stage would refuse, bad YAML, a name outside presets/) is refused naming file and key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import load_script

from vdsr import presets as presets_module
from vdsr import recipe
from vdsr.config import ParamsError, from_dict
from vdsr.presets import PRESETS_DIR, load_preset, set_options

REPO_ROOT = Path(__file__).resolve().parents[1]


def train_params_class():
    stage = load_script(REPO_ROOT / "stages" / "train.py", "train_stage").TrainParams
    assert stage is recipe.TrainParams  # the presets are validated with this very schema
    return stage


@pytest.mark.parametrize("name", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_shipped_presets_are_valid(name):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    overrides = load_preset(name, params_file=REPO_ROOT / "params.yaml")
    sections = set()
    for key, value in overrides.items():
        *path, field = key.split(".")
        section = params
        for part in path:
            section = section[part]
        section[field] = value
        sections.add(".".join(path))
    for dotted in sections:  # each changed model section passes the stage's checks
        if dotted.startswith("train."):
            _, model = dotted.split(".")
            from_dict(train_params_class(), params["train"][model], dotted)
    done = subprocess.run([sys.executable, "-m", "vdsr.presets", name], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()  # what $(python -m vdsr.presets NAME) hands to dvc exp run
    assert words == set_options(overrides) and words[0] == "-S"
    assert {yaml.safe_load(word.split("=", 1)[1]) == overrides[word.split("=", 1)[0]] for word in words[1::2]} == {True}


def test_bad_presets_are_refused_with_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"lr": 0.1, "sets": ["a"]}}))
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "typo.yaml").write_text("train.learning_rate: 0.01\n")
    with pytest.raises(ParamsError, match="typo.yaml: train.learning_rate: expected a key of"):
        load_preset("typo", presets, params)
    with pytest.raises(ParamsError, match=r"'missing': no such preset; .* \(known: typo\)"):
        load_preset("missing", presets, params)
    with pytest.raises(ParamsError, match="must not contain spaces"):
        set_options({"train.model": "a b"})


def preset_dir(tmp_path: Path, **presets: str) -> Path:
    folder = tmp_path / "presets"
    folder.mkdir()
    for name, text in presets.items():
        (folder / f"{name}.yaml").write_text(text)
    return folder


BAD_VALUES = {  # preset text -> what the error says (the train stage's own words)
    "train.vdsr.lr: fast\n": "train.vdsr.lr: expected a number, got 'fast'",
    "train.vdsr.depth: 6.5\n": "train.vdsr.depth: expected an integer, got 6.5",
    "train.vdsr: 5\n": "train.vdsr: expected a mapping (a whole train section), got 5",
    "train.vdsr.min_lr: 0.5\n": "train.vdsr.min_lr: expected a number in [0, lr] (lr is 0.1), got 0.5",
    "train.vdsr.lr: 0.001\ntrain.vdsr.lr_schedule: cosine\ntrain.vdsr.min_lr: 0.01\n":
        "train.vdsr.min_lr: expected a number in [0, lr] (lr is 0.001), got 0.01",
    "train.srcnn.compile: fast\n": "train.srcnn.compile: expected one of 'none', 'default'",
    "download.workers: '8'\n": "download.workers: expected a value like params.yaml's 8, got '8'",
    "prepare.scales: 2\n": "prepare.scales: expected a value like params.yaml's [2, 3, 4], got 2",
}


@pytest.mark.parametrize("text", list(BAD_VALUES), ids=range(len(BAD_VALUES)))
def test_values_the_stage_would_refuse_are_refused_naming_the_key(tmp_path, text, monkeypatch):
    presets = preset_dir(tmp_path, bad=text)
    monkeypatch.chdir(REPO_ROOT)  # params.yaml as `python -m vdsr.presets` reads it
    with pytest.raises(ParamsError) as refused:
        load_preset("bad", presets)
    message = str(refused.value)
    assert message.startswith(str(presets / "bad.yaml")), message
    assert BAD_VALUES[text] in message, message


def test_preset_names_stay_inside_presets(tmp_path, capsys):
    presets = preset_dir(tmp_path, good="train.vdsr.lr: 0.05\n")
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    (presets / "sub").mkdir()
    (presets / "sub" / "b.yaml").write_text("train.vdsr.lr: 0.05\n")
    for name in ("../params", "sub/b", "good.yaml", "", "GOOD"):
        with pytest.raises(ParamsError, match=re.escape(f"{name!r}: no such preset; a preset is one of the files "
                                                        "presets/*.yaml (known: good)")):
            load_preset(name, presets, tmp_path / "params.yaml")
    assert load_preset("good", presets, tmp_path / "params.yaml") == {"train.vdsr.lr": 0.05}
    # the command line: exit 2, one line, no traceback
    done = subprocess.run([sys.executable, "-m", "vdsr.presets", "../params"], check=False, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr.startswith("vdsr.presets: error: '../params': no such preset") and "Traceback" not in done.stderr


def test_yaml_errors_name_file_line_and_column(tmp_path, capsys, monkeypatch):
    presets = preset_dir(tmp_path, broken="train.vdsr.lr: 0.05\ntrain.vdsr.epochs: [3\n",
                         twice="train.vdsr.lr: 0.05\ntrain.vdsr.lr: 0.01\n", listed="- train.vdsr.lr\n")
    params = REPO_ROOT / "params.yaml"
    with pytest.raises(ParamsError, match=re.escape(f"{presets / 'broken.yaml'}: not valid YAML: ")) as refused:
        load_preset("broken", presets, params)
    assert f'in "{presets / "broken.yaml"}", line 2, column 20' in str(refused.value)
    with pytest.raises(ParamsError, match="found key 'train.vdsr.lr' twice") as refused:
        load_preset("twice", presets, params)
    assert f'in "{presets / "twice.yaml"}", line 2, column 1' in str(refused.value)
    with pytest.raises(ParamsError, match=re.escape(f"{presets / 'listed.yaml'}: expected a mapping of dotted")):
        load_preset("listed", presets, params)

    monkeypatch.setattr(presets_module, "PRESETS_DIR", presets)  # the command line on these presets
    monkeypatch.chdir(REPO_ROOT)  # its params.yaml
    capsys.readouterr()
    assert presets_module.main(["broken"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"vdsr.presets: error: {presets / 'broken.yaml'}: not valid YAML")
    assert "line 2, column 20" in err and "Traceback" not in err


def recipe_patches(overrides: dict, model: str) -> int:
    """Training patches of ``train.<model>`` under a preset: epochs x steps per epoch x batch."""
    return (overrides[f"train.{model}.epochs"] * overrides[f"train.{model}.steps_per_epoch"]
            * overrides[f"train.{model}.batch_size"])


def test_smoke_preset_is_small_and_what_make_smoke_runs():
    smoke = load_preset("smoke", params_file=REPO_ROOT / "params.yaml")
    assert smoke["prepare.train_sets"] == ["T91"] and smoke["evaluate.sets"] == ["Set5", "Set14"]
    for model in ("vdsr", "srcnn"):  # minutes on a CPU, not the paper's 80 full epochs
        assert recipe_patches(smoke, model) <= 10_000, (model, recipe_patches(smoke, model))
    planned = subprocess.run(["make", "-n", "smoke", "SMOKE_NAME=smoke-x"], check=False, cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr
    assert "-m vdsr.presets smoke) &&" in planned.stdout
    assert "dvc exp run --temp -n smoke-x $smoke_params" in planned.stdout
    assert " -S " not in planned.stdout  # no flags of its own beside the preset's


def test_make_smoke_stops_on_a_bad_preset(tmp_path):
    """A smoke preset that does not load stops `make smoke` before `dvc exp run`: an empty
    $(python -m vdsr.presets smoke) would otherwise run the paper's schedule."""
    for name in ("Makefile", "params.yaml"):
        shutil.copyfile(REPO_ROOT / name, tmp_path / name)
    shutil.copytree(REPO_ROOT / "vdsr", tmp_path / "vdsr", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "smoke.yaml").write_text("train.vdsr.lrr: 0.001\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(["make", "smoke", f"PYTHON={sys.executable}", "SMOKE_NAME=smoke-x"], check=False,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0, done
    assert "smoke.yaml: train.vdsr.lrr: expected a key of params.yaml" in done.stderr, done.stderr
    assert "dvc exp run" not in done.stderr and "Smoke run done" not in done.stdout, done


def test_cpu_hour_preset_is_the_cpu_release_recipe_sized_for_an_hour():
    hour = load_preset("cpu-hour", params_file=REPO_ROOT / "params.yaml")
    release = load_preset("release-cpu", params_file=REPO_ROOT / "params.yaml")
    assert {key: hour[key] for key in release if key != "train.vdsr.epochs"} == \
        {key: value for key, value in release.items() if key != "train.vdsr.epochs"}
    assert hour["train.vdsr.precision"] == "auto"
    patches = recipe_patches(hour, "vdsr")  # the measured 40-80 patches/s of the 20x64 VDSR, bf16
    assert 40 * 50 * 60 <= patches <= 40 * 65 * 60, patches  # 50-65 minutes at the slow end
    assert patches / 80 >= 25 * 60, patches  # and not a few minutes at the fast end
    assert "Urban100" not in hour["evaluate.sets"]  # its evaluation alone would take most of an hour
    text = (PRESETS_DIR / "cpu-hour.yaml").read_text()
    assert f"{patches:,} patches" in text and "40-80" in text  # the comment says how it was sized

"""Presets: every shipped preset names only real params keys, validates as a train section, and
prints `dvc exp run -S` options that survive the shell's word splitting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import load_script
from vdsr.config import ParamsError, from_dict
from vdsr.presets import PRESETS_DIR, load_preset, set_options

REPO_ROOT = Path(__file__).resolve().parents[1]


def train_params_class():
    return load_script(REPO_ROOT / "stages" / "train.py", "train_stage").TrainParams


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
        _, model = dotted.split(".")
        from_dict(train_params_class(), params["train"][model], dotted)
    done = subprocess.run([sys.executable, "-m", "vdsr.presets", name], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
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
    with pytest.raises(ParamsError, match=r"no such preset \(known: typo\)"):
        load_preset("missing", presets, params)
    with pytest.raises(ParamsError, match="must not contain spaces"):
        set_options({"train.model": "a b"})

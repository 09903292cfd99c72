"""``vdsr evaluate`` with the bicubic model: the same numbers as the baseline stage's code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vdsr.cli import main
from vdsr.evaluate import bicubic_upscaler, evaluate_folder, summary

from conftest import run_child


def test_evaluate_bicubic_prints_table_and_writes_json(set5_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "set5.json"
    assert main(["evaluate", "--images", str(set5_dir), "--scales", "2", "4", "--model", "bicubic", "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table == {"Set5": summary(evaluate_folder(set5_dir, [2, 4], bicubic_upscaler))}
    assert table["Set5"]["x2"]["psnr"] == pytest.approx(33.66, abs=0.01)
    printed = capsys.readouterr().out
    assert "Set5" in printed and "33.66" in printed and "28.42" in printed


def test_evaluate_errors_name_the_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_child([sys.executable, "-m", "vdsr.cli", "evaluate", "--images", str(tmp_path / "empty"), "--model", "bicubic"],
                       timeout=120)
    assert result.returncode == 2
    assert f"{tmp_path / 'empty'}: no image files" in result.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    result = run_child([sys.executable, "-m", "vdsr.cli", "evaluate", "--images", str(tmp_path / "bad"), "--model", "bicubic"],
                       timeout=120)
    assert result.returncode == 2 and "x.png: not a readable image" in result.stderr


def test_evaluate_refuses_an_image_too_small_naming_it(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "set").mkdir()
    Image.fromarray(np.full((18, 30, 3), 120, np.uint8)).save(tmp_path / "set" / "tiny.png")
    result = run_child([sys.executable, "-m", "vdsr.cli", "evaluate", "--images", str(tmp_path / "set"),
                        "--scales", "4", "--model", "bicubic"], timeout=120)
    assert result.returncode == 2
    assert f"{tmp_path / 'set' / 'tiny.png'}: image is 30x18, too small to evaluate at x4" in result.stderr


def test_evaluate_self_ensemble_is_its_own_number(set5_dir: Path, tmp_path: Path) -> None:
    """--self-ensemble scores the 8-pass mean of the model (vdsr.inference), not the plain model."""
    import torch

    from vdsr.inference import self_ensemble
    from vdsr.models import ModelConfig, build_model, save_model
    from vdsr.inference import model_upscaler

    torch.manual_seed(0)
    model = build_model(ModelConfig("vdsr", depth=3, width=4)).eval()
    path = tmp_path / "tiny.pt"
    save_model(path, model, ModelConfig("vdsr", depth=3, width=4), {})
    images = tmp_path / "Set5"
    images.mkdir()
    (images / "bird.png").symlink_to(set5_dir / "bird.png")  # one image keeps it quick
    plain, ensembled = tmp_path / "plain.json", tmp_path / "plus.json"
    assert main(["evaluate", "--images", str(images), "--scales", "3", "--model", str(path), "--json", str(plain)]) == 0
    assert main(["evaluate", "--images", str(images), "--scales", "3", "--model", str(path), "--self-ensemble",
                 "--json", str(ensembled)]) == 0
    upscaler = model_upscaler(model, torch.device("cpu"))
    assert json.loads(ensembled.read_text())["Set5"] == summary(evaluate_folder(images, [3], self_ensemble(upscaler)))
    assert json.loads(plain.read_text())["Set5"] == summary(evaluate_folder(images, [3], upscaler))
    assert json.loads(plain.read_text()) != json.loads(ensembled.read_text())
    help_text = run_child([sys.executable, "-m", "vdsr.cli", "evaluate", "--help"], timeout=120).stdout
    assert "--self-ensemble" in help_text and "8x the time" in help_text

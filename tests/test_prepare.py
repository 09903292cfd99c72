"""Stage ``prepare``: the HDF5 patch files, checked against a recomputation from the images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from vdsr.evaluate import degrade, hr_luma
from vdsr.images import ImageError, list_images, read_image
from vdsr.prepare import load_patches, load_validation, write_training_set, write_validation_set
from vdsr.resize import imresize

from conftest import REPO_ROOT, run_child

OPTIONS = {"scales": [2, 3], "downsizing": [1.0, 0.7], "patch_size": 41, "stride": 41}


def test_training_set_layout_and_content(set5_dir: Path, tmp_path: Path) -> None:
    images = list_images(set5_dir)
    counts = write_training_set(images, tmp_path / "train.h5", workers=2, **OPTIONS)
    patches = load_patches(tmp_path / "train.h5")
    n = sum(counts.values())
    assert patches.lr.shape == (n, 1, 41, 41) and patches.lr.dtype == np.float16
    assert patches.hr.shape == (n, 1, 41, 41) and patches.hr.dtype == np.uint8
    assert sorted(set(patches.scale.tolist())) == [2, 3]
    assert 16 <= patches.hr.min() and patches.hr.max() <= 235
    with h5py.File(tmp_path / "train.h5") as h5:
        assert json.loads(h5.attrs["params"]) == OPTIONS
        assert set(json.loads(h5.attrs["sources"])) == {p.name for p in images}
        assert json.loads(h5.attrs["patches_per_scale"]) == counts
        assert h5["lr"].chunks == (64, 1, 41, 41)

    # The first patches are baby.png at down-sizing 1.0, scale 2, in row-major grid order.
    baby = read_image(set5_dir / "baby.png")
    hr = hr_luma(baby, 2)
    lr = degrade(hr, 2)
    np.testing.assert_array_equal(patches.hr[0, 0], hr[:41, :41])
    np.testing.assert_array_equal(patches.hr[1, 0], hr[:41, 41:82])
    np.testing.assert_allclose(patches.lr[1, 0], lr[:41, 41:82], atol=1e-3)  # float16 storage
    per_row = hr.shape[1] // 41
    np.testing.assert_array_equal(patches.hr[per_row, 0], hr[41:82, :41])
    # The down-sized copy: MATLAB imresize of the uint8 RGB image, then its luma.
    shrunk = hr_luma(imresize(baby, 0.7), 2)
    first_shrunk = (hr.shape[0] // 41) * per_row + counts_of(baby, 3)
    np.testing.assert_array_equal(patches.hr[first_shrunk, 0], shrunk[:41, :41])


def counts_of(image: np.ndarray, scale: int) -> int:
    hr = hr_luma(image, scale)
    return (hr.shape[0] // 41) * (hr.shape[1] // 41)


def test_same_params_same_bytes_and_serial_equals_parallel(set5_dir: Path, tmp_path: Path) -> None:
    images = list_images(set5_dir)
    write_training_set(images, tmp_path / "a.h5", workers=1, **OPTIONS)
    write_training_set(images, tmp_path / "b.h5", workers=2, **OPTIONS)
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_validation_set(set5_dir: Path, tmp_path: Path) -> None:
    write_validation_set(list_images(set5_dir), tmp_path / "val.h5", scales=[2, 4])
    val = load_validation(tmp_path / "val.h5")
    assert sorted(val) == [2, 4]
    names = [name for name, _, _ in val[4]]
    assert names == ["baby", "bird", "butterfly", "head", "woman"]
    name, lr, hr = val[4][2]
    expected_hr = hr_luma(read_image(set5_dir / "butterfly.png"), 4)
    np.testing.assert_array_equal(hr, expected_hr)
    np.testing.assert_allclose(lr, degrade(expected_hr, 4), atol=1e-6)
    assert lr.dtype == np.float32


def test_bad_inputs_are_named_and_leave_nothing(set5_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "train.h5"
    with pytest.raises(ValueError, match="empty training set"):
        write_training_set([], out, workers=1, **OPTIONS)
    tiny = tmp_path / "tiny.png"
    from PIL import Image

    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tiny)
    with pytest.raises(ImageError, match=r"tiny\.png.*smaller than a 41x41 patch"):
        write_training_set([set5_dir / "baby.png", tiny], out, workers=2, **OPTIONS)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((set5_dir / "bird.png").read_bytes()[:2000])
    with pytest.raises(ImageError, match=r"truncated\.png: not a readable image"):
        write_training_set([truncated], out, workers=1, **OPTIONS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.png", "truncated.png"]


def test_stage_rejects_bad_params_before_work(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(
        "prepare:\n  train_sets: [T91]\n  val_set: Set5\n  scales: [2, 9]\n  downsizing: [1.0]\n"
        "  patch_size: 41\n  stride: 41\n  workers: 1\n"
    )
    result = run_child([sys.executable, str(REPO_ROOT / "stages/prepare.py")], cwd=tmp_path, timeout=60)
    assert result.returncode == 1
    assert "prepare.scales[1]: expected 2, 3 or 4, got 9" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "data").exists()

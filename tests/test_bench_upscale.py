"""bench/upscale.py on a tiny picture with a tiny model: a real run in a child process, its JSON's
shape, the reference's PSNR difference 0 and a default that is one of the measured variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "upscale.py"


def run_bench(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *options], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_tiny_run_writes_the_summary(tmp_path: Path, tiny_file: Path, set5_dir: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_bench(tmp_path, "--model", str(tiny_file), "--megapixels", "0.002", "--sets", str(set5_dir),
                       "--quality-crop", "36", "--variants", "torch fp32", "torch bf16", "--peak-side", "16",
                       "--json", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads(out.read_text())
    assert {"device", "reference", "default", "variants", "peak_gflops"} <= set(summary)
    names = [row["name"] for row in summary["variants"]]
    assert names == ["torch-nchw fp32", "torch fp32", "torch bf16"]
    assert summary["reference"] == "torch-nchw fp32" and summary["default"] in names
    for row in summary["variants"]:
        assert {"name", "seconds_per_megapixel", "psnr_delta_db", "gflops"} <= set(row)
        assert row["seconds_per_megapixel"] > 0 and row["gflops"] > 0
        assert set(row["seconds_per_megapixel_by_scale"]) == {"x2", "x3", "x4"}
        assert set(row["psnr_delta_db_by_set_scale"]) == {f"{set5_dir.name} x{k}" for k in (2, 3, 4)}
    reference = summary["variants"][0]
    assert reference["psnr_delta_db"] == 0 and reference["speedup"] == 1
    # fp32 channels_last differs from NCHW in the summation order only: far below one uint8 level
    assert summary["variants"][1]["psnr_delta_db"] < 0.01
    assert set(summary["peak_gflops"]) == {"fp32", "bf16"} and min(summary["peak_gflops"].values()) > 0
    assert summary["flop_per_pixel"] == 2 * (4 * 9 + 4 * 4 * 9 + 4 * 9)  # the convolutions' multiply-adds
    assert "default" in result.stdout and "peak of a 3x3 64-channel convolution" in result.stdout


def test_an_unknown_variant_is_refused_by_name(tmp_path: Path, tiny_file: Path) -> None:
    result = run_bench(tmp_path, "--model", str(tiny_file), "--variants", "torch fp16")
    assert result.returncode != 0
    assert "--variants 'torch fp16': expected one of" in result.stderr and "'torch bf16'" in result.stderr

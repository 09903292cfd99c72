"""bench/freed_memory.py on Set5 x2 with a tiny model: a real run of both modes in child processes,
its JSON's shape and the same table printed by both (the allocator must not change a number)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from test_upscale import tiny_model

from vdsr.models import ModelConfig, save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_both_modes_run_and_print_the_same_table(tmp_path: Path, set5_dir: Path) -> None:
    model, out = tmp_path / "tiny.pt", tmp_path / "bench.json"
    save_model(model, tiny_model(), ModelConfig("vdsr", 3, 4), {"note": "test"})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "freed_memory.py"), "--rounds", "1", "--json", str(out),
                           "--", "-m", "vdsr.cli", "evaluate", "--images", str(set5_dir), "--model", str(model),
                           "--scales", "2", "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    assert summary["same_stdout"] is True
    for mode in ("glibc", "kept"):
        assert summary[mode]["wall_s"] > 0 and summary[mode]["maxrss_mib"] > 0 and summary[mode]["minflt"] > 0
    assert summary["speedup_median_of_pairs"] > 0
    assert "kept is" in done.stdout and "x as fast" in done.stdout


def test_a_failing_command_fails_the_bench(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "freed_memory.py"), "--rounds", "1", "--",
                           "-m", "vdsr.cli", "evaluate", "--images", str(tmp_path / "missing"), "--model", "bicubic"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "glibc run of" in done.stderr and "missing" in done.stderr

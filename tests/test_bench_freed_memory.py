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

REPO = Path(__file__).resolve().parents[1]


def run_bench(cwd: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "bench" / "freed_memory.py"), *options], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_both_modes_run_and_print_the_same_table(tmp_path: Path, tiny_file: Path, set5_dir: Path) -> None:
    out = tmp_path / "bench.json"
    done = run_bench(tmp_path, "--rounds", "1", "--json", str(out), "--", "-m", "vdsr.cli", "evaluate", "--images",
                     str(set5_dir), "--model", str(tiny_file), "--scales", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    summary = json.loads(out.read_text())
    assert summary["same_stdout"] is True
    for mode in ("glibc", "kept"):
        assert summary[mode]["wall_s"] > 0 and summary[mode]["maxrss_mib"] > 0 and summary[mode]["minflt"] > 0
    assert summary["speedup_median_of_pairs"] > 0
    assert "kept is" in done.stdout and "x as fast" in done.stdout


def test_a_failing_command_fails_the_bench(tmp_path: Path) -> None:
    done = run_bench(tmp_path, "--rounds", "1", "--", "-m", "vdsr.cli", "evaluate", "--images", str(tmp_path / "missing"),
                     "--model", "bicubic")
    assert done.returncode != 0 and "glibc run of" in done.stderr and "missing" in done.stderr

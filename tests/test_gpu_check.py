"""bench/gpu_check.py, the GPU acceptance script, run on the CPU with a tiny model so that it cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import run_child

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_the_cpu_and_writes_its_summary(set5_dir, tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run_child(
        [sys.executable, str(REPO_ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", "--no-compile",
         "--workers", "1", "--raw", str(set5_dir.parent), "--out", str(out)],
        cwd=tmp_path, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["device"].startswith("cpu (") and summary["model"] == "VDSR 3x8"
    speed = summary["speed"]
    assert speed["sync_check"] == "not applicable (cpu)"
    assert set(speed["variants"]) == {"reference", "ours (defaults)"}
    rates = {name: row["patches_per_s"] for name, row in speed["variants"].items()}
    assert all(rate > 0 for rate in rates.values()) and all(row["mfu"] is None for row in speed["variants"].values())
    assert speed["best"] == "ours (defaults)"  # the only variant besides the reference without --compile
    assert speed["speedup_vs_reference"] == round(rates[speed["best"]] / rates["reference"], 2)
    quality = summary["quality"]
    for precision in {summary["default_precision"], "fp32"}:
        assert {"x2", "x3", "x4", "train_s"} <= set(quality[precision]) and quality[precision]["train_s"] > 0
        assert all(15 < quality[precision][f"x{s}"] < 50 for s in (2, 3, 4))  # PSNR in dB, evaluated
    last = done.stdout.strip().splitlines()[-1]  # the summary line, after the JSON of speed and quality
    assert last == (f"gpu_check: not applicable (cpu); {speed['speedup_vs_reference']}x the reference; "
                    f"wrote {out} in {summary['elapsed_s']:.0f} s"), last


def test_flops_per_patch_by_hand():
    from conftest import load_script

    from vdsr.models import ModelConfig

    module = load_script(REPO_ROOT / "bench" / "gpu_check.py", "gpu_check")
    # VDSR 20x64 on 41x41: 9 taps x (64 + 18 x 64 x 64 + 64) MACs per pixel, 2 FLOPs a MAC, x3 for training
    assert module.train_flops_per_patch(ModelConfig("vdsr", 20, 64), 41) == 3 * 2 * 9 * 73_856 * 41 * 41

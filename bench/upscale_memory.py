"""Peak memory of ``vdsr upscale`` on one large synthetic picture, measured on the child process.

    python bench/upscale_memory.py --side 2000 --scale 4                 # this tree's code
    python bench/upscale_memory.py --side 2000 --scale 4 --code OLD_TREE --code .   # before / after

Writes a smooth random RGB PNG of ``--side`` x ``--side`` pixels and a tiny random VDSR (depth 3,
width 4: memory is what is measured, and the network pass per pixel costs the same order for any
model; ``--model`` runs a real one), then runs ``python -m vdsr.cli upscale`` once per ``--code``
tree (a folder holding ``vdsr/``, put first on ``PYTHONPATH``) on the same picture. For each run it
prints the command's peak resident set size (``ru_maxrss`` of ``RUSAGE_CHILDREN`` in a small
launcher whose only child it is), bytes per output pixel and wall seconds, and whether the
decoded outputs of all runs are identical.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


# Runs argv[2:] and writes its peak RSS (RUSAGE_CHILDREN: that child alone) to the file argv[1]. A
# small launcher, because Linux counts the RSS a child had when it was forked (here ~10 MB, not the
# test process's hundreds) into its ru_maxrss.
LAUNCHER = """import resource, subprocess, sys
status = subprocess.run(sys.argv[2:]).returncode
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(status)
"""


@dataclass
class Measured:
    """A finished child: exit status, stderr, peak RSS in bytes, wall seconds."""

    returncode: int
    stderr: str
    peak_rss: int
    seconds: float


def run_measured(command: list[str], *, env: dict[str, str], cwd: Path, timeout: float) -> Measured:
    """Run ``command`` and return its peak RSS (Linux ``ru_maxrss`` is in KiB); killed after ``timeout`` s."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="measured.") as folder:
        report = Path(folder) / "maxrss"
        child = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(report), *command], env=env, cwd=cwd,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        try:
            _, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the launcher and the command
            child.communicate()
            raise
        peak = int(report.read_text()) * 1024 if report.is_file() else 0
    return Measured(child.returncode, stderr, peak, time.perf_counter() - start)


def synthetic_picture(path: Path, side: int, seed: int = 0) -> None:
    """A smooth random RGB PNG (noise on a gradient, blurred by a box upscale), ``side`` x ``side``."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (side // 8 + 1, side // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-12, 13, (side, side, 3), dtype=np.int16)
    Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8)).save(path, compress_level=1)


def tiny_model(path: Path) -> None:
    """A random VDSR of depth 3 and width 4 saved as a model file."""
    import torch

    from vdsr.models import ModelConfig, build_model, save_model

    torch.manual_seed(0)
    config = ModelConfig("vdsr", 3, 4)
    save_model(path, build_model(config).eval(), config, {"note": "bench/upscale_memory.py"})


def upscale_measured(
    code: Path, picture: Path, model: Path, out: Path, scale: int, extra: list[str], timeout: float
) -> Measured:
    """``vdsr upscale picture`` with the ``vdsr`` package of the tree ``code``, measured."""
    kept = os.environ.get("PYTHONPATH")  # e.g. a folder holding an extra's packages
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code.resolve()), *([kept] if kept else [])])}
    command = [sys.executable, "-m", "vdsr.cli", "upscale", str(picture), "--scale", str(scale),
               "--model", str(model), "--device", "cpu", "-o", str(out), *extra]
    return run_measured(command, env=env, cwd=out.parent, timeout=timeout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=2000, help="input picture side in pixels")
    parser.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    parser.add_argument("--code", type=Path, action="append", help="tree holding vdsr/ (repeatable; default: this one)")
    parser.add_argument("--model", type=Path, help="model file (default: a tiny random VDSR)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("extra", nargs="*", help="more vdsr upscale options, after --")
    args = parser.parse_args()
    codes = args.code or [REPO]
    with tempfile.TemporaryDirectory(prefix="upscale_memory.") as folder:
        work = Path(folder)
        picture = work / "picture.png"
        synthetic_picture(picture, args.side)
        model = args.model or work / "tiny.pt"
        if args.model is None:
            tiny_model(model)
        out_pixels = (args.side * args.scale) ** 2
        print(f"{args.side}x{args.side} RGB at x{args.scale}: {out_pixels / 1e6:.1f} Mpx out, model {model.name}")
        outputs = []
        for index, code in enumerate(codes):
            out = work / f"out{index}"
            measured = upscale_measured(code, picture, model, out, args.scale, args.extra, args.timeout)
            if measured.returncode != 0:
                sys.exit(f"{code}: exit status {measured.returncode}\n{measured.stderr}")
            outputs.append(out / f"picture_x{args.scale}.png")
            print(f"{str(code):40s} peak RSS {measured.peak_rss / 2**20:8.0f} MiB "
                  f"({measured.peak_rss / out_pixels:6.1f} B per output pixel), {measured.seconds:6.1f} s")
        if len(outputs) > 1:
            first = np.asarray(Image.open(outputs[0]))
            same = all(np.array_equal(first, np.asarray(Image.open(path))) for path in outputs[1:])
            print("decoded outputs identical:", same)


if __name__ == "__main__":
    main()

"""Wall time and peak memory of a command with glibc's malloc as it is and with freed memory kept
(:func:`vdsr.runtime.keep_freed_memory`), side by side in one run, the two alternating.

    python bench/freed_memory.py                          # vdsr evaluate, pretrained/vdsr.pt, Set5 x2/x3/x4
    python bench/freed_memory.py --rounds 5 -- -m vdsr.cli evaluate --images data/raw/B100 --scales 2
    python bench/freed_memory.py --show 8 -- bench/train.py --synthetic --skip-reference --steps 5

Each run is a fresh Python process: a small launcher that, for "kept", calls keep_freed_memory()
first and, for "glibc", sets ``VDSR_KEEP_FREED_MEMORY=0`` so that the command's own call does
nothing; then it runs the command (``-m MODULE args`` or ``SCRIPT args``) in that process and
writes its peak RSS, minor page faults and system seconds. Prints the median wall seconds of each,
the median of the paired ratios, and whether the two printed the same standard output (for
``vdsr evaluate``: the same table, to the last digit).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT = ["-m", "vdsr.cli", "evaluate", "--images", "data/raw/Set5", "--model", "pretrained/vdsr.pt",
           "--device", "cpu"]
MODES = ("glibc", "kept")

LAUNCHER = """import json, resource, runpy, sys
report, mode, command = sys.argv[1], sys.argv[2], sys.argv[3:]
if mode == "kept":
    from vdsr.runtime import keep_freed_memory
    assert keep_freed_memory(), "keep_freed_memory() did not apply (not glibc?)"
sys.argv = command[1:] if command[0] == "-m" else command
try:
    if command[0] == "-m":
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(command[0], run_name="__main__")
except SystemExit as stop:
    if stop.code not in (None, 0):
        raise
usage = resource.getrusage(resource.RUSAGE_SELF)
json.dump({"maxrss_mib": usage.ru_maxrss / 1024, "minflt": usage.ru_minflt, "sys_s": usage.ru_stime}, open(report, "w"))
"""


def run_once(mode: str, command: list[str], timeout: float) -> dict:
    """One run of ``command`` under ``mode``: wall seconds, the launcher's report, standard output."""
    env = dict(os.environ, VDSR_KEEP_FREED_MEMORY="0" if mode == "glibc" else "1")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", LAUNCHER, str(report), mode, *command], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{mode} run of {' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        return {"wall_s": wall, **json.loads(report.read_text()), "stdout": done.stdout}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs (default 3)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run before it is killed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--show", type=int, default=0, metavar="N",
                        help="print the last N lines of each run's standard output (a figure of its own)")
    parser.add_argument("command", nargs="*", help="after --: -m MODULE args, or SCRIPT args (default: vdsr evaluate "
                        "of pretrained/vdsr.pt on data/raw/Set5)")
    args = parser.parse_args()
    command = args.command or DEFAULT
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for index in range(args.rounds):
        for mode in MODES if index % 2 == 0 else MODES[::-1]:
            runs[mode].append(run_once(mode, command, args.timeout))
            last = runs[mode][-1]
            print(f"round {index + 1} {mode}: {last['wall_s']:.1f} s, peak RSS {last['maxrss_mib']:.0f} MiB, "
                  f"{last['minflt']} minor faults, {last['sys_s']:.1f} s in the kernel", flush=True)
            for line in last["stdout"].splitlines()[-args.show:] if args.show else []:
                print(f"    {line}")
    ratios = [g["wall_s"] / k["wall_s"] for g, k in zip(runs["glibc"], runs["kept"])]
    summary = {mode: {key: statistics.median(r[key] for r in runs[mode]) for key in ("wall_s", "maxrss_mib",
                                                                                     "minflt", "sys_s")}
               for mode in MODES}
    summary["speedup_median_of_pairs"] = statistics.median(ratios)
    summary["same_stdout"] = len({r["stdout"] for mode in MODES for r in runs[mode]}) == 1
    summary["command"] = command
    for mode in MODES:
        s = summary[mode]
        print(f"{mode:>6}: median {s['wall_s']:.1f} s, peak RSS {s['maxrss_mib']:.0f} MiB, {s['minflt']:.0f} minor "
              f"faults, {s['sys_s']:.1f} s in the kernel")
    print(f"kept is {summary['speedup_median_of_pairs']:.2f}x as fast (median of {len(ratios)} pairs); same "
          f"standard output: {summary['same_stdout']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A failing prepare worker ends the stage at once, naming the file, whatever the timing.

Repetition: the failure is a race in a pool, so each case runs many times, the broken item at
every position of a small set, with an image that cannot be read, a worker that raises and a worker
killed by a signal; every run must end within :data:`LIMIT_S` with the file named and no worker
left. Then the stage itself, as DVC runs it, a few times.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import multiprocessing
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pool_tasks import die_mid_message, read_or_die, read_or_fail
from vdsr.images import ImageError
from vdsr.prepare import WorkerError, map_in_order, write_training_set

from conftest import REPO_ROOT, run_child, stage_workdir

LIMIT_S = 10.0  # per failing run; about 0.5 s on an idle 2-core machine (spawning the workers)
IMAGES = 6
DAMAGES = {
    "truncated": lambda good: good[: len(good) // 3],
    "random-bytes": lambda good: random.Random(0).randbytes(len(good)),
    "empty": lambda good: b"",
}
SIGNALS = ("SIGKILL", "SIGTERM", "SIGSEGV")


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Six small RGB images, each big enough for one 41x41 patch."""
    paths = []
    for i in range(IMAGES):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 56, 3), np.uint8)).save(paths[-1])
    return paths


def no_worker_left(timeout_s: float = 5.0) -> bool:
    """Whether every child process of this one has ended (and been reaped) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while multiprocessing.active_children():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def timed_failure(run) -> tuple[float, BaseException]:
    started = time.monotonic()
    with pytest.raises((ImageError, WorkerError)) as raised:
        run()
    return time.monotonic() - started, raised.value


def test_damaged_image_at_every_position_ends_the_pool_at_once(images: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "train.h5"
    good = {path: path.read_bytes() for path in images}
    cases = list(itertools.product(range(IMAGES), DAMAGES))  # 18 cases
    seconds = []
    for position, damage in cases:
        victim = images[position]
        victim.write_bytes(DAMAGES[damage](good[victim]))
        took, error = timed_failure(functools.partial(
            write_training_set, images, out, scales=[2], downsizing=[1.0], patch_size=41, stride=41, workers=2))
        victim.write_bytes(good[victim])
        seconds.append(took)
        assert isinstance(error, ImageError) and str(error).startswith(f"{victim}: not a readable image"), error
        assert took < LIMIT_S, f"{damage} image at position {position}: {took:.1f} s"
        assert no_worker_left(), f"{damage} image at position {position}: workers still running"
        assert sorted(tmp_path.iterdir()) == sorted(images)  # no train.h5, no temporary file
    print(f"\n{len(seconds)} runs with a damaged image: max {max(seconds):.2f} s, mean {np.mean(seconds):.2f} s")


def test_worker_killed_by_a_signal_or_raising_ends_the_pool_at_once(images: list[Path]) -> None:
    cases = [(position, name) for position in range(IMAGES) for name in (*SIGNALS, "raises")]  # 24 runs
    seconds = []
    for position, name in cases:
        victim = str(images[position])
        task = (functools.partial(read_or_fail, victim) if name == "raises"
                else functools.partial(read_or_die, victim, name))

        def run() -> None:
            with contextlib.closing(map_in_order(task, images, workers=2)) as heights:
                assert all(height == 48 for height in heights)

        took, error = timed_failure(run)
        seconds.append(took)
        assert isinstance(error, WorkerError), error
        if name == "raises":
            assert str(error) == f"{victim}: ZeroDivisionError: integer division or modulo by zero"
        else:  # the worker that died is named, possibly beside the one other image then being read
            assert "a worker process died while processing it" in str(error) and victim in str(error), error
            assert str(error).count(str(images[0].parent)) <= 2, error
        assert took < LIMIT_S, f"{name} at position {position}: {took:.1f} s"
        assert no_worker_left(), f"{name} at position {position}: workers still running"
    print(f"\n{len(seconds)} runs with a killed or raising worker: max {max(seconds):.2f} s, "
          f"mean {np.mean(seconds):.2f} s")


def test_worker_killed_in_the_middle_of_a_result_message(images: list[Path]) -> None:
    """Half a message in the result pipe: the pool's own thread would wait for the rest forever."""
    seconds = []
    for position in range(IMAGES):
        victim = str(images[position])
        task = functools.partial(die_mid_message, victim)

        def run() -> None:
            with contextlib.closing(map_in_order(task, images, workers=2)) as heights:
                assert all(height == 48 for height in heights)

        took, error = timed_failure(run)
        seconds.append(took)
        assert isinstance(error, WorkerError) and victim in str(error), error
        assert took < LIMIT_S, f"position {position}: {took:.1f} s"
        assert no_worker_left(), f"position {position}: workers still running"
    print(f"\n{len(seconds)} runs with a worker killed mid-message: max {max(seconds):.2f} s")


def test_serial_and_pooled_results_agree_and_keep_their_order(images: list[Path]) -> None:
    """The pool returns results in the order of the items, as the serial path does."""
    task = functools.partial(read_or_die, "none", "SIGKILL")
    with contextlib.closing(map_in_order(task, images * 3, workers=2)) as pooled:
        assert list(pooled) == [48] * (3 * IMAGES)
    with contextlib.closing(map_in_order(str, images, workers=2)) as names:
        assert list(names) == [str(path) for path in images]
    assert list(map_in_order(str, images, workers=1)) == [str(path) for path in images]
    assert no_worker_left()


STAGE_PARAMS = {"prepare": {"train_sets": ["Set14"], "val_set": "Set5", "scales": [2], "downsizing": [1.0],
                            "workers": 2}}


@pytest.mark.parametrize("position", [0, 4, 8, 13])
def test_stage_with_a_damaged_image_exits_at_once(tmp_path: Path, shared_datasets: Path, position: int) -> None:
    """The issue's case: ``stages/prepare.py`` on Set14 with one truncated image, at several positions."""
    work = stage_workdir(tmp_path / "work", shared_datasets, STAGE_PARAMS)
    victim = sorted((work / "data/raw/Set14").iterdir())[position]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    started = time.monotonic()
    result = run_child([sys.executable, str(REPO_ROOT / "stages/prepare.py")], cwd=work, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"prepare: error: data/raw/Set14/{victim.name}: not a readable image" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (work / "data/prepared/train.h5").exists() and not (work / "data/prepared/val.h5").exists()
    print(f"\nstage with {victim.name} truncated: exit 1 after {took:.1f} s")

"""A failing prepare worker ends the stage at once, naming the file, whatever the timing.

Repetition: the failure is a race in a pool, so each case runs many times, the broken item at
every position of a small set, with an image that cannot be read, a worker that raises and a worker
killed by a signal; every run must end within :data:`LIMIT_S` with the file named and no worker
left. Then the stage itself, as DVC runs it, a few times.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import itertools
import multiprocessing
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pool_tasks import die_mid_message, read, read_or_die, read_or_fail
from vdsr.images import ImageError
from vdsr.prepare import WorkerError, map_in_order, write_training_set

from conftest import REPO_ROOT, run_child, stage_workdir

LIMIT_S = 5.0  # from a worker's failure to the error here; ~0.1 s on an idle 2-core machine
HANG_S = 600  # a hung run would hang pytest: faulthandler then prints every stack and ends it
IMAGES = 6
DAMAGES = {
    "truncated": lambda good: good[: len(good) // 3],
    "random-bytes": lambda good: random.Random(0).randbytes(len(good)),
    "empty": lambda good: b"",
}
SIGNALS = ("SIGKILL", "SIGTERM", "SIGSEGV")


@pytest.fixture(autouse=True)
def no_hang():
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Six small RGB images, each big enough for one 41x41 patch."""
    (tmp_path / "images").mkdir()
    paths = []
    for i in range(IMAGES):
        paths.append(tmp_path / "images" / f"img{i}.png")
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


def failure(task, items: list[Path], stamp: Path) -> tuple[float, BaseException]:
    """Run ``task`` over ``items`` in a 2-worker pool until it fails; (seconds from the failure in
    the worker, stamped in ``stamp``, to the error here; the error)."""
    stamp.unlink(missing_ok=True)
    with pytest.raises((ImageError, WorkerError)) as raised:
        with contextlib.closing(map_in_order(task, items, workers=2)) as heights:
            assert all(height == 48 for height in heights)
    assert not pool_threads(), "the pool's manager thread outlived the failure (a race at exit)"
    return time.monotonic() - float(stamp.read_text()), raised.value


def pool_threads() -> list[threading.Thread]:
    """The ProcessPoolExecutor manager threads still alive in this process."""
    return [thread for thread in threading.enumerate() if type(thread).__name__ == "_ExecutorManagerThread"]


def report(what: str, seconds: list[float]) -> None:
    print(f"\n{len(seconds)} runs, {what}: failure to error max {max(seconds):.2f} s, mean {np.mean(seconds):.2f} s")


def test_damaged_image_at_every_position_ends_the_pool_at_once(images: list[Path], tmp_path: Path) -> None:
    good = {path: path.read_bytes() for path in images}
    stamp, seconds = tmp_path / "failed-at", []
    for position, damage in itertools.product(range(IMAGES), DAMAGES):  # 18 runs
        victim = images[position]
        victim.write_bytes(DAMAGES[damage](good[victim]))
        took, error = failure(functools.partial(read, str(stamp)), images, stamp)
        victim.write_bytes(good[victim])
        seconds.append(took)
        assert isinstance(error, ImageError) and str(error).startswith(f"{victim}: not a readable image"), error
        assert took < LIMIT_S, f"{damage} image at position {position}: {took:.1f} s"
        assert no_worker_left(), f"{damage} image at position {position}: workers still running"
    report("a damaged image", seconds)


def test_the_writer_leaves_nothing_when_a_worker_fails(images: list[Path], tmp_path: Path) -> None:
    """write_training_set over the pool: the error names the file and no train.h5 is left."""
    good = images[0].read_bytes()
    for position in (0, IMAGES - 1):
        images[0].write_bytes(good)
        images[position].write_bytes(b"")
        with pytest.raises(ImageError, match=f"^{images[position]}: not a readable image"):
            write_training_set(images, tmp_path / "train.h5", scales=[2], downsizing=[1.0], patch_size=41,
                               stride=41, workers=2)
        assert sorted(tmp_path.iterdir()) == [tmp_path / "images"] and no_worker_left()


def test_worker_killed_by_a_signal_or_raising_ends_the_pool_at_once(images: list[Path], tmp_path: Path) -> None:
    stamp, seconds = tmp_path / "failed-at", []
    for position, name in itertools.product(range(IMAGES), (*SIGNALS, "raises")):  # 24 runs
        victim = str(images[position])
        task = (functools.partial(read_or_fail, str(stamp), victim) if name == "raises"
                else functools.partial(read_or_die, str(stamp), victim, name))
        took, error = failure(task, images, stamp)
        seconds.append(took)
        assert isinstance(error, WorkerError), error
        if name == "raises":
            assert str(error) == f"{victim}: ZeroDivisionError: integer division or modulo by zero"
        else:  # the worker that died is named, possibly beside the one other image then being read
            assert "a worker process died while processing it" in str(error) and victim in str(error), error
            assert str(error).count(str(images[0].parent)) <= 2, error
        assert took < LIMIT_S, f"{name} at position {position}: {took:.1f} s"
        assert no_worker_left(), f"{name} at position {position}: workers still running"
    report("a worker killed by a signal or raising", seconds)


def test_worker_killed_in_the_middle_of_a_result_message(images: list[Path], tmp_path: Path) -> None:
    """Half a message in the result pipe: the pool's own thread would wait for the rest forever."""
    stamp, seconds = tmp_path / "failed-at", []
    for position in range(IMAGES):  # 6 runs
        victim = str(images[position])
        took, error = failure(functools.partial(die_mid_message, str(stamp), victim), images, stamp)
        seconds.append(took)
        assert isinstance(error, WorkerError) and victim in str(error), error
        assert took < LIMIT_S, f"position {position}: {took:.1f} s"
        assert no_worker_left(), f"position {position}: workers still running"
    report("a worker killed in the middle of a result", seconds)


def test_serial_and_pooled_results_agree_and_keep_their_order(images: list[Path], tmp_path: Path) -> None:
    """The pool returns results in the order of the items, as the serial path does."""
    task = functools.partial(read, str(tmp_path / "failed-at"))
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

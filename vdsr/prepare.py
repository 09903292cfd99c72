"""Training and validation data: multi-scale Y-channel patches in HDF5 (VDSR's ``generate_train.m``).

For each training image, each down-sizing factor ``f`` and each scale ``s`` (VDSR, section 4.1):

1. the RGB image is shrunk by ``f`` with MATLAB ``imresize`` (uint8, as MATLAB; f = 1 keeps it);
2. HR = its uint8 luma (MATLAB ``rgb2ycbcr``), mod-cropped to ``s`` (:func:`vdsr.evaluate.hr_luma`);
3. LR = ``imresize(imresize(HR / 255, 1/s), s)``, the network input (:func:`vdsr.evaluate.degrade`);
4. aligned ``patch_size`` patches of both are cut on a grid of ``stride`` from the top-left corner.

All scales go into one file (multi-scale training); flips and rotations are applied on the fly by
the training loop, not stored. Images are processed by a pool of workers and appended to the file
by one writer, so memory stays bounded by a few images whatever the size of the set. Files are
written under a temporary name and renamed when complete.

Layout of ``train.h5`` (NCHW, one channel):

- ``lr``    (N, 1, P, P) float16  network input, Y / 255 (bicubic-degraded, unclipped, ~[0.06, 0.92])
- ``hr``    (N, 1, P, P) uint8    ground-truth luma Y in [16, 235]; the target is ``hr / 255``
- ``scale`` (N,)         uint8    the scale the pair was made for
- chunks of (64, 1, P, P) / (4096,), no compression; attributes ``params`` (JSON of the arguments),
  ``sources`` (JSON {file name: sha256}), ``patches_per_scale`` (JSON), ``layout``.

Layout of ``val.h5``: group ``x{s}`` per scale, in it one group per image name with ``lr``
(H, W) float32 (network input, as above) and ``hr`` (H, W) uint8; attribute ``sources``.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np
from tqdm import tqdm

from vdsr.color import modcrop, rgb2y
from vdsr.evaluate import degrade, hr_luma
from vdsr.images import ImageError, read_image
from vdsr.io import atomic_path, sha256_file
from vdsr.resize import imresize

log = logging.getLogger(__name__)

PATCH_CHUNK = 64  # patches per HDF5 chunk: one training batch reads a few chunks
START_METHOD = "spawn"  # workers are fresh interpreters: no threads, locks or open files inherited
IN_FLIGHT_PER_WORKER = 2  # tasks submitted ahead per worker: enough to keep them busy, bounded memory
WATCH_S = 1.0  # how often the consumer checks that no worker died unnoticed while it waits
MANAGER_JOIN_S = 5.0  # the most a failure waits for the pool's manager thread to end (~ms)

T = TypeVar("T")
R = TypeVar("R")


class WorkerError(RuntimeError):
    """A pool worker failed on an item, or died while on it (a signal, the OOM killer); names the item."""


@dataclass(frozen=True)
class PatchSet:
    """All training patches in memory (see the module docstring for dtypes and ranges)."""

    lr: np.ndarray  # (N, 1, P, P) float16, Y / 255
    hr: np.ndarray  # (N, 1, P, P) uint8, Y in [16, 235]
    scale: np.ndarray  # (N,) uint8


def grid_patches(image: np.ndarray, patch_size: int, stride: int) -> np.ndarray:
    """(n, P, P) patches of a (H, W) array at rows/columns 0, stride, 2*stride, ... that fit."""
    if image.shape[0] < patch_size or image.shape[1] < patch_size:
        return np.empty((0, patch_size, patch_size), dtype=image.dtype)
    windows = np.lib.stride_tricks.sliding_window_view(image, (patch_size, patch_size))[::stride, ::stride]
    return windows.reshape(-1, patch_size, patch_size)


def image_patches(
    image: np.ndarray, *, scales: Sequence[int], downsizing: Sequence[float], patch_size: int, stride: int
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield (scale, lr (n, P, P) float16, hr (n, P, P) uint8) for every down-sizing and scale."""
    for factor in downsizing:
        luma = rgb2y(image if factor == 1.0 else imresize(image, factor))
        for scale in scales:
            hr = modcrop(luma, scale)  # = hr_luma(shrunk, scale), the luma computed once
            lr = degrade(hr, scale)
            yield scale, grid_patches(lr, patch_size, stride).astype(np.float16), grid_patches(hr, patch_size, stride)


def _patches_of_file(task: tuple[Path, dict]) -> tuple[str, str, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Worker: read one image, check its size, cut all its patches."""
    path, options = task
    image = read_image(path)
    if min(image.shape[:2]) < options["patch_size"]:
        raise ImageError(
            f"{path}: image is {image.shape[1]}x{image.shape[0]}, smaller than a "
            f"{options['patch_size']}x{options['patch_size']} patch (prepare.patch_size)"
        )
    return path.name, sha256_file(path), list(image_patches(image, **options))


class _KeepFirstWriteError:
    """A binary file for h5py's ``fileobj`` driver that keeps the first ``OSError`` of a write.

    HDF5 (2.0, through h5py 3.16) crashes the process -- a segmentation fault when the file or
    the library is closed -- once the OS has refused one of its writes (disk full, file size
    limit). Through this object HDF5 never sees a failure: the first error is kept, later writes
    are dropped and reads past what was written come back as zeros, so HDF5 closes cleanly and
    the writer raises the kept error instead (:meth:`check`), naming ``name``.
    """

    def __init__(self, file: io.FileIO, name: Path) -> None:
        self.file, self.name, self.error = file, name, None

    def write(self, data: bytes) -> int:
        view = memoryview(data).cast("B")
        if self.error is None:
            try:
                while view:  # an unbuffered write may be short; the next one then fails
                    view = view[self.file.write(view) :]
            except OSError as error:
                self.error = error
        return len(data)

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        if self.error is not None and 0 <= len(data) < size:
            data += bytes(size - len(data))
        return data

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.file.truncate(size)
            except OSError as error:
                self.error = error
        return self.file.tell() if size is None else size

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def flush(self) -> None:
        pass  # unbuffered: every write has reached the OS

    def check(self) -> None:
        """Raise the kept error as ``OSError(errno, reason, name)``."""
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror or str(self.error), str(self.name))


@contextlib.contextmanager
def _new_h5(out_path: str | Path) -> Iterator[tuple[h5py.File, _KeepFirstWriteError]]:
    """A new HDF5 file written under a temporary name and renamed onto ``out_path`` when complete.

    A refused write (disk full, ...) raises ``OSError`` naming ``out_path`` once HDF5 has closed
    the file; the temporary file is removed and ``out_path`` keeps its previous content.
    """
    with atomic_path(out_path) as tmp, open(tmp, "r+b", buffering=0) as raw:
        sink = _KeepFirstWriteError(raw, Path(out_path))
        try:
            with h5py.File(sink, "w", track_order=True) as h5:
                yield h5, sink
        finally:
            sink.check()  # also when the block failed: a full disk explains most later errors


def _append(dataset: h5py.Dataset, rows: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + rows.shape[0], axis=0)
    dataset[start:] = rows


def write_training_set(
    image_paths: Sequence[Path],
    out_path: str | Path,
    *,
    scales: Sequence[int],
    downsizing: Sequence[float],
    patch_size: int,
    stride: int,
    workers: int = 1,
) -> dict[str, int]:
    """Write ``train.h5`` (layout in the module docstring); return the patch count per scale.

    Raises :class:`ImageError` naming the file for an unreadable image or one smaller than a
    patch, and ``ValueError`` when no patch at all could be cut; ``out_path`` is then untouched.
    """
    if not image_paths:
        raise ValueError("empty training set: no training images were given (prepare.train_sets)")
    options = {"scales": list(scales), "downsizing": list(downsizing), "patch_size": patch_size, "stride": stride}
    counts = {f"x{s}": 0 for s in scales}
    sources: dict[str, str] = {}
    tasks = [(Path(p), options) for p in image_paths]
    shape = (0, 1, patch_size, patch_size)
    with _new_h5(out_path) as (h5, sink):
        lr = h5.create_dataset("lr", shape, np.float16, maxshape=(None, *shape[1:]),
                               chunks=(PATCH_CHUNK, *shape[1:]), track_times=False)
        hr = h5.create_dataset("hr", shape, np.uint8, maxshape=(None, *shape[1:]),
                               chunks=(PATCH_CHUNK, *shape[1:]), track_times=False)
        scale_of = h5.create_dataset("scale", (0,), np.uint8, maxshape=(None,), chunks=(4096,), track_times=False)
        with contextlib.closing(map_in_order(_patches_of_file, tasks, workers=workers, describe=_task_path)) as results:
            for name, digest, per_scale in tqdm(results, total=len(tasks), desc="prepare", unit="img"):
                sources[name] = digest
                for scale, lr_patches, hr_patches in per_scale:
                    _append(lr, lr_patches[:, None])
                    _append(hr, hr_patches[:, None])
                    _append(scale_of, np.full(len(hr_patches), scale, np.uint8))
                    counts[f"x{scale}"] += len(hr_patches)
                sink.check()  # stop at the first refused write, not after the last image
        if lr.shape[0] == 0:
            raise ValueError(f"empty training set: no {patch_size}x{patch_size} patch in {len(tasks)} images")
        h5.attrs["params"] = json.dumps(options, sort_keys=True)
        h5.attrs["sources"] = json.dumps(sources, sort_keys=True)
        h5.attrs["patches_per_scale"] = json.dumps(counts)
        h5.attrs["layout"] = "NCHW; lr float16 Y/255 network input; hr uint8 Y in [16,235]; scale uint8"
    return counts


# --- the process pool -------------------------------------------------------------------------

_task_states: Any = None  # in a worker: the shared per-task states (see map_in_order)
_NOT_STARTED, _RUNNING, _FINISHED = 0, 1, 2


def _init_worker(states: Any) -> None:
    global _task_states
    _task_states = states


def _run_task(fn: Callable[[T], R], index: int, item: T) -> R:
    """Worker: ``fn(item)``, marking task ``index`` running then finished in the shared states."""
    _task_states[index] = _RUNNING
    result = fn(item)
    _task_states[index] = _FINISHED
    return result


def _call(fn: Callable[[T], R], item: T, describe: Callable[[T], str]) -> R:
    """``fn(item)`` with the error contract of :func:`map_in_order` (serial path)."""
    try:
        return fn(item)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001  (named, with its cause, for the one error line)
        raise WorkerError(f"{describe(item)}: {type(error).__name__}: {error}") from error


def map_in_order(
    fn: Callable[[T], R], items: Sequence[T], *, workers: int, describe: Callable[[T], str] = str
) -> Iterator[R]:
    """``fn(item)`` for each item, in the order of ``items``, computed by ``workers`` processes.

    ``workers`` <= 1 runs serially in this process (easier to debug and profile). Otherwise a
    :class:`ProcessPoolExecutor` of ``spawn``-ed workers (:data:`START_METHOD`: nothing is forked
    from this process, which may run threads such as tqdm's monitor) computes at most
    ``IN_FLIGHT_PER_WORKER * workers`` items ahead of the consumer, so memory holds a few results
    whatever the number of items. ``fn`` must be picklable (a module-level function).

    The first failure ends the iteration at once: an :class:`ImageError` from ``fn`` is raised as it
    is (it names its file); any other exception becomes a :class:`WorkerError` naming the item
    (``describe(item)``), its cause attached; a worker that dies (a signal, the OOM killer) raises
    :class:`WorkerError` naming the item(s) it was on. The workers are then killed and the pool is
    shut down without waiting for them. Close the generator (``contextlib.closing``) so that a
    consumer that stops early stops the workers too.
    """
    if workers <= 1:
        for item in items:
            yield _call(fn, item, describe)
        return
    context = multiprocessing.get_context(START_METHOD)
    states = context.RawArray("b", len(items))  # per item: not started, running or finished in a worker
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(states,))
    window: collections.deque[tuple[int, Future]] = collections.deque()
    completed = False
    try:
        for index, item in enumerate(items):
            window.append((index, _submit(pool, _run_task, fn, index, item)))
            if len(window) >= IN_FLIGHT_PER_WORKER * workers:
                yield _result(pool, window.popleft(), items, window, states, describe)
        while window:
            yield _result(pool, window.popleft(), items, window, states, describe)
        completed = True
    finally:
        if completed:
            pool.shutdown(wait=True)  # the workers are idle: they exit at once
        else:
            _stop(pool)


def _submit(pool: ProcessPoolExecutor, *args: Any) -> Future:
    """``pool.submit(*args)``; once the pool is broken, a future holding that error (raised in order)."""
    try:
        return pool.submit(*args)
    except BrokenProcessPool as error:
        future: Future = Future()
        future.set_exception(error)
        return future


def _result(pool: ProcessPoolExecutor, head: tuple[int, Future], items: Sequence[T],
            window: collections.deque[tuple[int, Future]], states: Any, describe: Callable[[T], str]) -> Any:
    """The result of the oldest task, or the error that names its item (see :func:`map_in_order`)."""
    index, future = head
    while not wait([future], timeout=WATCH_S).done:
        if any(process.exitcode is not None for process in _workers(pool)):
            _stop(pool)  # a worker died unnoticed (see _stop): the pool breaks now
    try:
        return future.result()
    except ImageError:
        raise
    except BrokenProcessPool as error:
        pending = [head, *window]
        running = [i for i, _ in pending if states[i] == _RUNNING] or [i for i, _ in pending]
        which = describe(items[running[0]]) if len(running) == 1 else \
            "one of " + ", ".join(describe(items[i]) for i in running)
        raise WorkerError(f"{which}: a worker process died while processing it (killed by a signal, "
                          "or out of memory?)") from error
    except Exception as error:  # noqa: BLE001
        raise WorkerError(f"{describe(items[index])}: {type(error).__name__}: {error}") from error


def _workers(pool: ProcessPoolExecutor) -> list[multiprocessing.process.BaseProcess]:
    """The pool's worker processes (a private table up to Python 3.14 at least; empty once shut down)."""
    return list(dict(getattr(pool, "_processes", None) or {}).values())


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill the workers and shut ``pool`` down, waiting for nothing (a failure, or an early stop).

    A worker killed while it sends a result leaves half a message in the result pipe, and the
    pool's manager thread then waits for the rest forever (CPython 3.11-3.13): this process holds
    the pipe's write end as well, so no end-of-file comes, the futures never complete and the
    interpreter cannot exit (it joins that thread). With every worker killed, closing our write
    end turns that wait into an end-of-file: the pool breaks, fails its futures and ends its thread.

    That thread is then joined, for at most :data:`MANAGER_JOIN_S`: left running, it closes its
    wake-up pipe while the interpreter's exit hook writes to it (no lock between them in 3.11), and
    a refused stage would end with an ``OSError: Bad file descriptor`` traceback after its message.
    """
    manager = getattr(pool, "_executor_manager_thread", None)  # private, as above; None once shut down
    for process in _workers(pool):
        process.kill()  # even in the middle of a task
    writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)  # private, as above
    if writer is not None:
        writer.close()
    pool.shutdown(wait=False, cancel_futures=True)
    if manager is not None:
        manager.join(MANAGER_JOIN_S)


def _task_path(task: tuple[Path, dict]) -> str:
    return str(task[0])


def write_validation_set(image_paths: Sequence[Path], out_path: str | Path, *, scales: Sequence[int]) -> None:
    """Write ``val.h5``: whole validation images per scale (layout in the module docstring)."""
    if not image_paths:
        raise ValueError("empty validation set: no validation images were given (prepare.val_set)")
    with _new_h5(out_path) as (h5, sink):
        sources = {}
        for path in image_paths:
            image = read_image(path)
            sources[Path(path).name] = sha256_file(path)
            for scale in scales:
                hr = hr_luma(image, scale)
                if min(hr.shape) <= 2 * scale:  # PSNR shaves `scale` pixels from each side
                    raise ImageError(
                        f"{path}: image is {image.shape[1]}x{image.shape[0]}, too small to validate x{scale} "
                        f"(more than {2 * scale} pixels per side needed after mod-crop)"
                    )
                group = h5.require_group(f"x{scale}").create_group(Path(path).stem)
                group.create_dataset("lr", data=degrade(hr, scale).astype(np.float32), track_times=False)
                group.create_dataset("hr", data=hr, track_times=False)
            sink.check()
        h5.attrs["sources"] = json.dumps(sources, sort_keys=True)


def load_patches(path: str | Path) -> PatchSet:
    """Read all of ``train.h5`` into memory; a clear error if it is missing or not in this layout."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            patches = PatchSet(lr=h5["lr"][...], hr=h5["hr"][...], scale=h5["scale"][...])
    except (OSError, KeyError) as error:
        raise ValueError(f"{path}: not a training patch file (datasets lr, hr, scale): {error}") from None
    if not (patches.lr.shape == patches.hr.shape and patches.lr.shape[0] == patches.scale.shape[0]):
        raise ValueError(f"{path}: lr {patches.lr.shape}, hr {patches.hr.shape}, scale {patches.scale.shape} disagree")
    return patches


def patch_size_of(path: str | Path) -> int:
    """Side of the patches in ``train.h5``, read from the dataset's shape without loading it."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            return int(h5["lr"].shape[-1])
    except (OSError, KeyError) as error:
        raise ValueError(f"{path}: not a training patch file (datasets lr, hr, scale): {error}") from None


def load_validation(path: str | Path) -> dict[int, list[tuple[str, np.ndarray, np.ndarray]]]:
    """``{scale: [(image name, lr (H, W) float32, hr (H, W) uint8), ...]}`` from ``val.h5``."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as h5:
            return {
                int(key[1:]): [(name, group["lr"][...], group["hr"][...]) for name, group in h5[key].items()]
                for key in h5
            }
    except (OSError, KeyError) as error:
        raise ValueError(f"{path}: not a validation file (groups x<scale>/<image>/lr, hr): {error}") from None

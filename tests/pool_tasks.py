"""Task functions for the pool tests, in a module of their own: spawned workers import it by name
(``tests/`` is on the path the parent passes them), without pytest or the test modules.

Each writes the moment it fails (``time.monotonic()``, one clock for all processes on Linux) to
``stamp``, so that a test can time the failure itself, not the start of the workers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from vdsr.images import ImageError, read_image


def _stamp(stamp: str) -> None:
    Path(stamp).write_text(repr(time.monotonic()))


def read(stamp: str, path: Path) -> int:
    """The height of the image at ``path``; a damaged image raises :class:`ImageError`."""
    try:
        return read_image(path).shape[0]
    except ImageError:
        _stamp(stamp)
        raise


def read_or_die(stamp: str, victim: str, signal_name: str, path: Path) -> int:
    """As :func:`read`; the worker kills itself with ``signal_name`` on ``victim``."""
    if str(path) == victim:
        _stamp(stamp)
        os.kill(os.getpid(), getattr(signal, signal_name))
    return read(stamp, path)


def read_or_fail(stamp: str, victim: str, path: Path) -> int:
    """As :func:`read`; a plain bug (``ZeroDivisionError``) on ``victim``."""
    if str(path) == victim:
        _stamp(stamp)
        return 1 // 0
    return read(stamp, path)


def die_mid_message(stamp: str, victim: str, path: Path) -> int:
    """As :func:`read_or_die`, but on ``victim`` the worker first writes the start of a result message
    to the pool's result pipe (a 4-byte length, then fewer bytes), as a kill in the middle of
    sending a large result leaves it."""
    if str(path) == victim:
        import gc
        import struct
        from multiprocessing.queues import SimpleQueue

        (queue,) = [o for o in gc.get_objects() if isinstance(o, SimpleQueue)]  # the pool's result queue
        os.write(queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"partial")
        _stamp(stamp)
        os.kill(os.getpid(), signal.SIGKILL)
    return read(stamp, path)

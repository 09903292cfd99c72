"""Task functions for the pool tests, in a module of their own: spawned workers import it by name
(``tests/`` is on the path the parent passes them), without pytest or the test modules."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from vdsr.images import read_image


def read_or_die(victim: str, signal_name: str, path: Path) -> int:
    """Read ``path`` and return its height; the worker kills itself with ``signal_name`` on ``victim``."""
    if str(path) == victim:
        os.kill(os.getpid(), getattr(signal, signal_name))
    return read_image(path).shape[0]


def read_or_fail(victim: str, path: Path) -> int:
    """Read ``path`` and return its height; a plain bug (``ZeroDivisionError``) on ``victim``."""
    if str(path) == victim:
        return 1 // 0
    return read_image(path).shape[0]


def die_mid_message(victim: str, path: Path) -> int:
    """As :func:`read_or_die`, but on ``victim`` the worker first writes the start of a result message
    to the pool's result pipe (a 4-byte length, then fewer bytes), as a kill in the middle of
    sending a large result leaves it."""
    if str(path) == victim:
        import gc
        import struct
        from multiprocessing.queues import SimpleQueue

        (queue,) = [o for o in gc.get_objects() if isinstance(o, SimpleQueue)]  # the pool's result queue
        os.write(queue._writer.fileno(), struct.pack("!i", 1 << 20) + b"partial")
        os.kill(os.getpid(), signal.SIGKILL)
    return read_image(path).shape[0]

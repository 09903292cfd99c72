"""A folder whose files are replaced all at once: after a kill at any instant it holds the old set
or the new one, never a mix (the release folder ``pretrained/``, :mod:`vdsr.release`).

The files stay plain paths in a plain folder (``pretrained/vdsr.pt`` is read by ``vdsr upscale``
and tracked by git); what changes at once is the folder itself:

1. :func:`replacing` makes a sibling staging folder ``.<name>.new`` holding hard links to the
   folder's entries that are kept (copies where links fail), the caller writes the new files into
   it, and everything is fsynced;
2. the staging folder and the folder are exchanged in one system call (Linux ``renameat2`` with
   ``RENAME_EXCHANGE``; ext4, xfs, btrfs, tmpfs): ``<name>`` is never missing and never mixed;
3. the staging name, now holding the old set, is removed.

Where the exchange is not available (another system, a file system without it) step 2 is two
renames: ``<name>`` -> ``.<name>.old``, then ``.<name>.new`` -> ``<name>``. A kill between them
leaves no ``<name>``, and :func:`recover` (run before every replacement) puts ``.<name>.old`` back.
:func:`recover` also removes a staging or set-aside folder left by a kill (``kill -9`` skips all
cleanup). :func:`locked` keeps two writers from replacing the same folder at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import sys
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

PORTABLE_ENV = "VDSR_ATOMIC_DIR_PORTABLE"  # tests only: "1" takes the two-rename path even where the exchange works
_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory


def sibling(target: Path, role: str) -> Path:
    """``.<name>.new`` (staging) or ``.<name>.old`` (set aside by the two-rename path) beside ``target``."""
    return target.with_name(f".{target.name}.{role}")


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold an exclusive lock for replacing ``target``: ``flock`` on its parent folder (which must
    exist), released when the block ends or the process dies. ``OSError`` (EBUSY) naming ``target``
    if another process holds it; no lock where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(errno.EBUSY, "another process is replacing this folder; wait for it to end",
                          str(target)) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def recover(target: Path) -> list[str]:
    """Make ``target`` whole again after a replacement that was killed; return what was done.

    - ``.<name>.old`` without ``<name>``: the two-rename path was killed between its renames; the
      old set is renamed back (the new one, staged, is dropped: it was never in place);
    - ``.<name>.new``: a staging folder (killed before the exchange) or the old set (killed after
      it); removed either way, ``<name>`` being whole;
    - ``.<name>.old`` beside ``<name>``: the old set after the second rename; removed.

    Call it under :func:`locked`, before a replacement.
    """
    staging, aside = sibling(target, "new"), sibling(target, "old")
    done = []
    if aside.is_dir() and not target.exists():
        os.rename(aside, target)
        done.append(f"restored {target} from {aside.name}")
    for leftover in (staging, aside):
        if leftover.exists() or leftover.is_symlink():
            _remove(leftover)
            done.append(f"removed {leftover}")
    if done:
        _fsync_dir(target.parent)
    return done


@contextlib.contextmanager
def replacing(target: Path, replaced: Collection[str],
              on_step: Callable[[str], None] = lambda point: None) -> Iterator[Path]:
    """Yield a staging folder holding ``target``'s entries except the names ``replaced``; when the
    block ends without error, the staging folder becomes ``target`` at once (see the module
    docstring). On an error (Ctrl-C included) the staging folder is removed and ``target`` is
    left as it was, or as the new set if the error came after the switch.

    ``on_step(point)`` is called at each point where a kill must leave a whole set: "copied",
    "staged" (all written and fsynced), "aside" (two-rename path only), "swapped"; the caller
    adds its own between its files. Call :func:`recover` first, under :func:`locked`.
    """
    staging = sibling(target, "new")
    staging.mkdir()  # FileExistsError if a leftover is there: recover() first
    try:
        if target.is_dir():
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
            _link_entries(target, staging, set(replaced))
        on_step("copied")
        yield staging
        _fsync_tree(staging)
        on_step("staged")
        _switch(staging, target, on_step)
    except BaseException:
        recover(target)
        raise


def _switch(staging: Path, target: Path, on_step: Callable[[str], None]) -> None:
    """Put ``staging`` in place of ``target`` (exchange, or two renames), then remove the old set."""
    if not target.exists():
        os.rename(staging, target)
        old = None
    elif _exchange(staging, target):
        old = staging  # now holding the old set
    else:
        old = sibling(target, "old")
        os.rename(target, old)
        on_step("aside")
        os.rename(staging, target)
    _fsync_dir(target.parent)
    on_step("swapped")
    if old is not None:
        _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux >= 3.15 ``renameat2(RENAME_EXCHANGE)``, glibc >= 2.28);
    False where the system, its C library or the file system cannot (then nothing has changed)."""
    if not sys.platform.startswith("linux") or os.environ.get(PORTABLE_ENV) == "1":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _link_entries(source: Path, dest: Path, skip: set[str]) -> None:
    """Hard-link (or copy) ``source``'s entries into ``dest``, except ``skip`` and the temporaries
    that :func:`vdsr.io.atomic_path` leaves beside those names when killed."""
    for entry in os.scandir(source):
        if entry.name in skip or any(entry.name.startswith(f".{name}.") and entry.name.endswith(".tmp")
                                     for name in skip):
            continue
        target = dest / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, target)


def _link_or_copy(source: str, dest: str | Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (so a power cut after the switch keeps them)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every system can fsync a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()

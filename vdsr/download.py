"""Fetching the benchmark images listed in ``data/manifest.json``, verified by sha256.

The manifest names its public sources (``"sources": {"dcscn": {"base_url": ..}, ..}``) and,
for each set (T91, BSD200, Set5, Set14, B100, Urban100), the source it comes from and its files
as ``{name, path, sha256}``: ``path`` is where the file lives under that source (``base_url +
path`` on the internet), ``name`` is the canonical name it is saved under, ``root/<set>/<name>``.

Each set is fetched from its source's ``base_url`` unless a mirror replaces them all
(:func:`resolve_source`): another ``http(s)://`` base URL, or a local folder, holding every
source's files at their public relative paths (``<folder>/<path>``; a local folder is read
through ``file://`` URLs, so both go through one code path).

:func:`download_sets` leaves ``root`` holding exactly the selected sets of the manifest, because
DVC tracks it as one output:

- a file already present with the right sha256 is kept and not fetched again;
- a present file with a wrong sha256 is deleted and fetched again;
- anything else in a selected set's folder (stray files, leftovers of an interrupted run) and
  every entry of ``root`` that is not a selected set's folder is removed;
- each file is streamed to a temporary name beside its destination while being hashed, and moved
  into place with ``os.replace`` only once its sha256 matches. A failed file leaves nothing behind;
  files that completed and verified stay, so a rerun fetches only what is missing.

Transient failures (timeouts, refused or reset connections, HTTP 408/429/5xx, truncated bodies,
checksum mismatches) are retried with exponential backoff; other HTTP 4xx answers and files
missing from a local mirror are permanent and not retried. Failures are collected and reported
together, one line per file with its URL, in a :class:`DownloadError`.

Manifest names and paths are validated before anything is written: no absolute paths, no ``..``,
no path separators in names, and every destination must resolve inside ``root`` (a symlink that
leads out of it is refused, never followed for writing).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError

from tqdm import tqdm

from vdsr.io import atomic_path, describe_os_error, sha256_file

MIRROR_ENV = "VDSR_DATA_MIRROR"  # environment variable: a mirror of all the manifest's sources
MAX_BACKOFF_S = 30.0  # longest wait between two attempts, whatever the number of retries
_CHUNK = 1 << 16  # bytes read per network read
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(ValueError):
    """``data/manifest.json`` is missing, malformed or names an unsafe path."""


class DownloadError(RuntimeError):
    """Files could not be fetched or verified, or a destination is unsafe; the message says which."""


class _ChecksumMismatch(Exception):
    """The bytes received do not have the manifest's sha256 (retried like a transient failure)."""


@dataclass(frozen=True)
class ManifestEntry:
    name: str  # canonical file name under root/<set>/
    path: str  # relative POSIX path under the source (base URL or mirror folder)
    sha256: str  # lowercase hex digest of the file's bytes


@dataclass(frozen=True)
class Manifest:
    sets: dict[str, tuple[ManifestEntry, ...]]
    base_urls: dict[str, str]  # set name -> base URL of its public source; a file is at base_url + entry.path


@dataclass(frozen=True)
class DownloadReport:
    source: str  # the mirror the files came from (file:// for a local folder), else "manifest sources"
    fetched: int  # files downloaded and verified in this run
    skipped: int  # files already present with the right sha256
    removed: int  # stray entries deleted from root (including files with a wrong sha256)


# --- the manifest -------------------------------------------------------------------------------


def _check_name(value: object, what: str) -> str:
    """A single safe path component: no separators, not hidden, not ``.`` or ``..``."""
    ok = (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and not value.startswith(".")  # leading dots are reserved for temporary files
        and not any(c in value for c in "/\\\0")
    )
    if not ok:
        raise ManifestError(f"{what}: {value!r} is not a plain file or folder name")
    return value


def _check_path(value: object, what: str) -> str:
    """A normalised relative POSIX path without ``..``, empty or ``.`` components."""
    if not isinstance(value, str) or "\\" in value or "\0" in value:
        raise ManifestError(f"{what}: {value!r} is not a relative POSIX path")
    parts = value.split("/")
    if value.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ManifestError(f"{what}: {value!r} must be relative, without '..', '.' or empty parts")
    return str(PurePosixPath(value))


def _parse_entry(raw: object, where: str) -> ManifestEntry:
    if not isinstance(raw, dict) or set(raw) != {"name", "path", "sha256"}:
        raise ManifestError(f"{where}: expected {{name, path, sha256}}, got {raw!r}")
    sha256 = raw["sha256"]
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise ManifestError(f"{where}.sha256: expected 64 lowercase hex digits, got {sha256!r}")
    return ManifestEntry(
        name=_check_name(raw["name"], f"{where}.name"),
        path=_check_path(raw["path"], f"{where}.path"),
        sha256=sha256,
    )


def _parse_set(raw: object, where: str) -> tuple[ManifestEntry, ...]:
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{where}: expected a non-empty list of files")
    entries = tuple(_parse_entry(item, f"{where}[{i}]") for i, item in enumerate(raw))
    names = [entry.name for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ManifestError(f"{where}: duplicate names {', '.join(duplicates)}")
    return entries


def _parse_sources(raw: object, where: str) -> dict[str, str]:
    """``{"<source>": {"base_url": "https://..", "about": ".."}}`` -> ``{source: base_url}``."""
    if not isinstance(raw, dict) or not raw:
        raise ManifestError(f"{where}: expected a non-empty object of sources")
    urls = {}
    for name, source in raw.items():
        base_url = source.get("base_url") if isinstance(source, dict) else None
        if not isinstance(base_url, str) or urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ManifestError(f"{where}.{name}.base_url: expected an http(s) URL, got {base_url!r}")
        urls[name] = base_url
    return urls


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest; :class:`ManifestError` names the file and the bad field."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path}: not valid JSON: {error}") from None
    if not isinstance(data, dict) or not isinstance(data.get("sets"), dict) or not data["sets"]:
        raise ManifestError(f"{path}: expected an object with 'sources' and a non-empty 'sets'")
    sources = _parse_sources(data.get("sources"), f"{path}: sources")
    sets, base_urls = {}, {}
    for name, raw in data["sets"].items():
        where = f"{path}: sets.{_check_name(name, f'{path}: set name')}"
        if not isinstance(raw, dict) or set(raw) != {"source", "files"}:
            raise ManifestError(f"{where}: expected {{source, files}}, got {type(raw).__name__}")
        if raw["source"] not in sources:
            raise ManifestError(f"{where}.source: expected one of {', '.join(sources)}, got {raw['source']!r}")
        sets[name] = _parse_set(raw["files"], f"{where}.files")
        base_urls[name] = sources[raw["source"]]
    return Manifest(sets=sets, base_urls=base_urls)


# --- sources ------------------------------------------------------------------------------------


def repository_root(cwd: Path | None = None) -> Path:
    """The user's repository, which a relative mirror folder is taken from: ``DVC_ROOT`` when DVC
    runs the stage (the user's repository even in ``dvc exp run --temp`` and ``--queue``, whose
    stages run in a copy under ``<root>/.dvc/tmp/exps/``), else ``cwd`` (default: the current
    folder; the stages run from the repository root). A path inside ``<root>/.dvc/tmp/exps`` is cut
    back to ``<root>``, as :func:`vdsr.tracking.store_root` does for the MLflow store."""
    root = Path(os.environ.get("DVC_ROOT") or cwd or Path.cwd()).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def resolve_source(base_url: str, mirror: str | None, root: Path | None = None) -> str:
    """The base URL to fetch from: ``mirror`` (a base URL or a local folder) if set, else ``base_url``.

    A mirror holds the files of every source of the manifest at their public relative paths.

    A local folder becomes a ``file://`` URL, so that ``<folder>/<path>`` is read like a download.
    A relative folder (``../shared/datasets``) is taken from ``root`` (default:
    :func:`repository_root`), not from the current folder: inside ``dvc exp run --temp`` or
    ``--queue`` that is a copy of the repository elsewhere. A missing folder is refused with the fix.
    """
    if not mirror:
        return _with_slash(base_url)
    if urllib.parse.urlsplit(mirror).scheme in ("http", "https", "file"):
        return _with_slash(mirror)
    given = Path(mirror).expanduser()
    base = root if root is not None else repository_root()
    folder = (given if given.is_absolute() else base / given).resolve()
    if not folder.is_dir():
        where = "" if given.is_absolute() else f" (a relative folder is taken from the repository root, {base})"
        raise DownloadError(f"{MIRROR_ENV}={mirror}: neither an http(s) URL nor an existing folder{where}: {folder} "
                            f"does not exist; set {MIRROR_ENV} to the absolute path of the folder that holds "
                            "the sources' files, or to a base URL")
    return _with_slash(folder.as_uri())


def _with_slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def file_url(source: str, entry: ManifestEntry) -> str:
    """Where ``entry`` is fetched from: the source's base URL joined with the entry's path."""
    return _with_slash(source) + urllib.parse.quote(entry.path)


# --- fetching one file --------------------------------------------------------------------------


def backoff_delay(attempt: int, base_s: float, cap_s: float = MAX_BACKOFF_S) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (0-based): base, 2 base, 4 base, ..."""
    return min(base_s * 2.0 ** min(attempt, 64), cap_s)  # the exponent bound avoids float overflow


def _fetch_once(url: str, destination: Path, sha256: str, timeout_s: float) -> None:
    """Stream ``url`` into a temporary file beside ``destination``; move it in place if the hash matches."""
    with atomic_path(destination) as tmp:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(tmp, "wb") as file:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                file.write(chunk)
        if digest.hexdigest() != sha256:
            raise _ChecksumMismatch(f"sha256 mismatch (got {digest.hexdigest()}, manifest {sha256})")


def _is_permanent(error: BaseException) -> bool:
    """Whether retrying cannot help: HTTP 4xx other than 408/429, or a file missing from a mirror."""
    if isinstance(error, HTTPError):
        return 400 <= error.code < 500 and error.code not in (408, 429)
    return isinstance(error, URLError) and isinstance(error.reason, FileNotFoundError)


def _describe(error: BaseException, timeout_s: float) -> str:
    """A short reason for a failed attempt, for the error report."""
    if isinstance(error, HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, OSError) and not isinstance(error, URLError) and error.filename:
        return describe_os_error(error)  # writing here failed (a read-only or full data/raw)
    reason = error.reason if isinstance(error, URLError) else error
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    if isinstance(reason, FileNotFoundError):
        return "not found in the mirror folder"
    if isinstance(error, URLError):
        return f"cannot connect ({reason})"
    if isinstance(error, http.client.HTTPException):
        return f"broken response ({type(error).__name__}: {error})"
    return str(error)


def _fetch_with_retries(
    url: str, destination: Path, sha256: str, *, retries: int, timeout_s: float, backoff_s: float
) -> str | None:
    """Fetch one file; ``None`` on success, else why it failed after the last attempt."""
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, destination, sha256, timeout_s)
            return None
        except (OSError, http.client.HTTPException, _ChecksumMismatch) as error:  # URLError is an OSError
            if _is_permanent(error) or attempt == retries:
                return f"{_describe(error, timeout_s)}, after {attempt + 1} attempt(s)"
            time.sleep(backoff_delay(attempt, backoff_s))
    raise AssertionError("unreachable")


# --- the whole download -------------------------------------------------------------------------


def _destinations(manifest: Manifest, sets: Sequence[str], root: Path) -> dict[Path, tuple[str, ManifestEntry]]:
    """``root/<set>/<name>`` for each selected file, refusing any that resolves outside ``root``."""
    real_root = root.resolve()
    destinations = {}
    for set_name in sets:
        for entry in manifest.sets[set_name]:
            destination = root / set_name / entry.name
            if not destination.resolve().is_relative_to(real_root):
                raise DownloadError(
                    f"refusing to write {destination}: it resolves to {destination.resolve()}, outside {real_root}"
                )
            destinations[destination] = (set_name, entry)
    return destinations


def _remove(path: Path) -> None:
    """Delete a file, a symlink (never its target) or a whole folder."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _prune(root: Path, sets: Sequence[str], destinations: dict[Path, tuple[str, ManifestEntry]]) -> int:
    """Remove what does not belong in ``root``: unselected set folders and stray entries; returns a count."""
    removed = 0
    for child in sorted(root.iterdir()):
        if child.name not in sets or not child.is_dir() or child.is_symlink():
            _remove(child)
            removed += 1
            continue
        for item in sorted(child.iterdir()):
            if item not in destinations or not item.is_file():
                _remove(item)
                removed += 1
    return removed


def _is_verified(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def download_sets(
    manifest: Manifest,
    sets: Sequence[str],
    root: str | Path,
    *,
    source: str | None = None,
    workers: int,
    retries: int,
    timeout_s: float,
    backoff_s: float = 0.5,
    progress: bool = True,
) -> DownloadReport:
    """Make ``root`` hold exactly the files of ``sets``, as ``root/<set>/<name>``, all verified.

    ``source`` is a mirror's base URL from :func:`resolve_source` that replaces the sets' own
    sources (``None``: each set from its manifest source); ``workers`` downloads run at once, each
    HTTP request waits at most ``timeout_s`` seconds, and a file is tried ``1 + retries`` times
    with waits of ``backoff_s``, ``2 backoff_s``, ... (capped at :data:`MAX_BACKOFF_S`) between
    attempts. Raises :class:`DownloadError` listing every file that failed, with its URL.
    """
    unknown = [name for name in sets if name not in manifest.sets]
    if unknown:
        raise DownloadError(f"unknown set(s) {', '.join(unknown)}; the manifest has {', '.join(manifest.sets)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    destinations = _destinations(manifest, sets, root)
    removed = _prune(root, sets, destinations)

    todo = {}
    for destination, (set_name, entry) in destinations.items():
        if _is_verified(destination, entry.sha256):
            continue
        if destination.exists() or destination.is_symlink():
            destination.unlink()  # a wrong file must not survive a failed fetch
            removed += 1
        todo[destination] = (set_name, entry)

    def url(set_name: str, entry: ManifestEntry) -> str:
        return file_url(source or manifest.base_urls[set_name], entry)

    failures = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(todo), unit="file", desc="download", disable=not progress or not todo
    ) as bar:
        futures = {
            pool.submit(
                _fetch_with_retries,
                url(set_name, entry),
                destination,
                entry.sha256,
                retries=retries,
                timeout_s=timeout_s,
                backoff_s=backoff_s,
            ): (set_name, entry)
            for destination, (set_name, entry) in todo.items()
        }
        for future in as_completed(futures):
            set_name, entry = futures[future]
            if (why := future.result()) is not None:
                failures.append(f"{set_name}/{entry.name}: {why} ({url(set_name, entry)})")
            bar.update()

    if failures:
        lines = "\n".join(f"  {line}" for line in sorted(failures))
        raise DownloadError(f"{len(failures)} of {len(todo)} file(s) failed:\n{lines}")
    return DownloadReport(source=source or "manifest sources", fetched=len(todo), skipped=len(destinations) - len(todo), removed=removed)

"""DVC stage ``download``: fetch the selected data sets into ``data/raw/<set>/<name>``, verified.

Run from the repository root: ``python stages/download.py``. Reads the ``download`` section of
``params.yaml`` and ``data/manifest.json``. ``VDSR_DATA_MIRROR`` (a local folder or a base URL
holding every source's files at their public relative paths) replaces the sets' sources; a
relative folder is taken from the repository root (``DVC_ROOT``), also in ``dvc exp run --temp``
and ``--queue``, whose stages run in a copy elsewhere. See
:mod:`vdsr.download` for what is kept, re-fetched and removed under ``data/raw``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from vdsr.config import ParamsError, load_section, require
from vdsr.download import (
    MIRROR_ENV,
    DownloadError,
    ManifestError,
    download_sets,
    load_manifest,
    repository_root,
    resolve_source,
)
from vdsr.io import error_message

MANIFEST = Path("data/manifest.json")
RAW_DIR = Path("data/raw")  # also the stage's `outs` in dvc.yaml

log = logging.getLogger("vdsr.stages.download")


@dataclass(frozen=True)
class DownloadParams:
    sets: list[str]  # data sets to fetch, names from data/manifest.json
    workers: int  # concurrent downloads
    retries: int  # attempts per file after the first, with exponential backoff
    timeout_s: float  # per HTTP request, seconds

    def __post_init__(self) -> None:
        known = list(load_manifest(MANIFEST).sets)  # valid set names are the manifest's
        require(len(self.sets) > 0, "download.sets", "at least one set", self.sets)
        for i, name in enumerate(self.sets):
            require(name in known, f"download.sets[{i}]", "one of " + ", ".join(known), name)
        require(len(set(self.sets)) == len(self.sets), "download.sets", "no repeated set", self.sets)
        require(self.workers >= 1, "download.workers", "an integer >= 1", self.workers)
        require(self.retries >= 0, "download.retries", "an integer >= 0", self.retries)
        timeout_ok = math.isfinite(self.timeout_s) and self.timeout_s > 0
        require(timeout_ok, "download.timeout_s", "a number of seconds > 0", self.timeout_s)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        params = load_section(DownloadParams, "download")
        log.info("download: params %s", dataclasses.asdict(params))
        sets, workers, retries, timeout_s = params.sets, params.workers, params.retries, params.timeout_s

        manifest = load_manifest(MANIFEST)
        mirror = os.environ.get(MIRROR_ENV)
        source = resolve_source("", mirror, repository_root()) if mirror else None  # relative: from the repository
        if source:
            log.info("download: source %s (%s=%s)", source, MIRROR_ENV, mirror)
        else:
            urls = sorted({manifest.base_urls[name] for name in sets})
            log.info("download: sources %s (base URLs of %s)", ", ".join(urls), MANIFEST)

        report = download_sets(
            manifest, sets, RAW_DIR, source=source, workers=workers, retries=retries, timeout_s=timeout_s
        )
    except (ParamsError, ManifestError, DownloadError, OSError) as error:  # OSError: a read-only or full data/raw
        print(f"download: error: {error_message(error)}", file=sys.stderr)
        return 1
    log.info(
        "download: fetched %d, skipped %d (already verified), removed %d stray -> %s/{%s}",
        report.fetched, report.skipped, report.removed, RAW_DIR, ",".join(sets),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

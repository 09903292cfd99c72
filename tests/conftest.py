"""Shared test fixtures. Tests talk to 127.0.0.1 only and never phone home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared/datasets beside the checkout (CI puts a read-only copy there); VDSR_DATA_MIRROR wins.
SHARED_DATASETS = Path(os.environ.get("VDSR_DATA_MIRROR", REPO_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The local byte-identical copy of the public data sets (see ../shared/datasets/SOURCES.md)."""
    if not (SHARED_DATASETS / "SHA256SUMS").is_file():
        raise RuntimeError(f"{SHARED_DATASETS}: the shared data set copy is missing (set VDSR_DATA_MIRROR)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def set5_dir(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> Path:
    """Set5 under its canonical names (baby, bird, ...), as the download stage lays it out."""
    import json
    import shutil

    manifest = json.loads((REPO_ROOT / "data" / "manifest.json").read_text())
    folder = tmp_path_factory.mktemp("raw") / "Set5"
    folder.mkdir()
    for entry in manifest["sets"]["Set5"]:
        shutil.copyfile(shared_datasets / entry["path"], folder / entry["name"])
    return folder

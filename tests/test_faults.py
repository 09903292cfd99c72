"""The data stages under faults: ``kill -9`` mid-write, a full disk, a read-only output folder.

Real processes and real file systems, no mocks:

- ``kill -9`` is a SIGKILL of the whole process group of ``dvc repro`` (DVC, the stage, its pool);
- a full disk is ``RLIMIT_FSIZE`` on the stage process with SIGXFSZ ignored, so ``write()`` fails
  with EFBIG exactly where ENOSPC would (it works unprivileged; ``chmod`` does not stop root);
- a read-only folder is a read-only bind mount in a private mount namespace (``unshare -rm``),
  so writes fail with EROFS whoever runs the tests; without user namespaces a non-root user gets
  ``chmod a-w`` instead, and root is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_checked, run_child, stage_workdir
from vdsr.prepare import load_patches

# Large enough that prepare writes train.h5 for a few seconds (200 images, x2: 78 MB).
KILL_PARAMS = {
    "download": {"sets": ["BSD200", "Set5"], "workers": 4},
    "prepare": {"train_sets": ["BSD200"], "val_set": "Set5", "scales": [2], "downsizing": [1.0], "workers": 1},
}
# Small enough for a second or two per stage run.
SMALL_PARAMS = {
    "prepare": {"train_sets": ["Set14"], "val_set": "Set5", "scales": [2, 4], "downsizing": [1.0], "workers": 1},
    "baseline": {"sets": ["Set5"], "scales": [2]},
}
OUTPUTS = {"prepare": ["data/prepared/train.h5", "data/prepared/val.h5"],
           "baseline": ["results/bicubic.json", "metrics/bicubic.json"]}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(root: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256(root / name) for name in names}


def temp_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp"))


# --- kill -9 ------------------------------------------------------------------------------------


def kill_while_writing(args: list[str], repo: Path, env: dict[str, str], pattern: str) -> Path:
    """Start ``args`` in its own process group, SIGKILL the group once ``pattern`` has 1 MiB written."""
    run = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            for path in (repo / "data/prepared").glob(pattern):
                try:
                    if path.stat().st_size >= 1 << 20:
                        return path
                except FileNotFoundError:  # renamed or removed between glob and stat
                    pass
            time.sleep(0.02)
        raise AssertionError(f"{pattern} never reached 1 MiB (run exited {run.poll()})")
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # DVC, the stage and its worker pool: one process group
        run.wait(timeout=30)


def test_kill_9_during_prepare_then_rerun_rebuilds_identical_file(pipeline_repo) -> None:
    repo, env = pipeline_repo(KILL_PARAMS)
    prepared = repo / "data/prepared"
    run_checked(["dvc", "repro", "download"], repo, env)

    # The first build of prepare, killed while train.h5 is being written.
    partial = kill_while_writing(["dvc", "repro", "prepare"], repo, env, ".train.h5.*.tmp")
    # Nothing under the final names: the stage never renamed its temporary files; only those are
    # left, under hidden names that no reader opens.
    assert not (prepared / "train.h5").exists() and not (prepared / "val.h5").exists()
    assert partial.exists() and temp_files(prepared)
    status = json.loads(run_checked(["dvc", "status", "--json", "prepare"], repo, env).stdout)
    assert "prepare" in status, status

    # DVC finds the killed process in its lock file (.dvc/tmp/rwlock), drops it and runs the stage;
    # DVC empties data/prepared before, so the temporary file goes too.
    rerun = run_checked(["dvc", "repro", "prepare"], repo, env)
    assert "Running stage 'prepare'" in rerun.stdout
    assert "had been killed. Auto removed it from the lock file" in rerun.stdout + rerun.stderr
    built = hashes(repo, OUTPUTS["prepare"])
    assert load_patches(prepared / "train.h5").lr.shape[0] > 1000
    assert temp_files(prepared) == []
    assert json.loads(run_checked(["dvc", "status", "--json", "prepare"], repo, env).stdout) == {}

    # An uninterrupted build gives the same bytes.
    run_checked(["dvc", "repro", "--force", "--single-item", "prepare"], repo, env)
    assert hashes(repo, OUTPUTS["prepare"]) == built

    # Killed again, now with a complete build in the cache: a plain rerun restores it without running.
    kill_while_writing(["dvc", "repro", "--force", "--single-item", "prepare"], repo, env, ".train.h5.*.tmp")
    assert not (prepared / "train.h5").exists()
    restored = run_checked(["dvc", "repro", "prepare"], repo, env)
    assert "Stage 'prepare' is cached - skipping run, checking out outputs" in restored.stdout
    assert hashes(repo, OUTPUTS["prepare"]) == built
    assert temp_files(prepared) == []


# --- disk full and read-only folders: the stage scripts in a working folder --------------------




def run_stage(stage: str, cwd: Path, *, file_size_limit: int | None = None, wrap: Sequence[str] = (),
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python stages/<stage>.py`` in ``cwd``; ``file_size_limit``: RLIMIT_FSIZE in bytes ("disk full")."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return run_child(
        [*wrap, sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py")], cwd=cwd, env=env, timeout=300,
        preexec_fn=limit_file_size if file_size_limit is not None else None,
    )


@pytest.fixture
def workdir(tmp_path: Path, shared_datasets: Path) -> Path:
    """A working folder where prepare and baseline have run once: the previous outputs."""
    root = stage_workdir(tmp_path / "work", shared_datasets, SMALL_PARAMS)
    for stage in ("prepare", "baseline"):
        result = run_stage(stage, root)
        assert result.returncode == 0, result.stderr
    return root


@pytest.mark.parametrize(
    ("stage", "limit", "failing"),
    [
        ("prepare", 8 << 20, "data/prepared/train.h5"),  # val.h5 (5.7 MB, written first) fits, train.h5 (18 MB) not
        ("prepare", 1 << 20, "data/prepared/val.h5"),
        ("baseline", 16, "results/bicubic.json"),  # written first
    ],
    ids=["prepare-train.h5", "prepare-val.h5", "baseline"],
)
def test_disk_full_fails_clearly_and_keeps_previous_outputs(workdir: Path, stage, limit, failing) -> None:
    before = hashes(workdir, [*OUTPUTS["prepare"], *OUTPUTS["baseline"]])

    result = run_stage(stage, workdir, file_size_limit=limit)
    # Before the fix, HDF5 crashed the process with a segmentation fault (-11) after the traceback.
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert f"{stage}: error: {failing}: File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert hashes(workdir, [*OUTPUTS["prepare"], *OUTPUTS["baseline"]]) == before
    assert temp_files(workdir) == []


def read_only_wrapper(folder: Path) -> list[str]:
    """argv prefix that runs a command with ``folder`` read-only; fails if this machine cannot."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30) if shutil.which("unshare") else None
    if probe is not None and probe.returncode == 0:
        # A private mount namespace: bind ``folder`` onto itself read-only, then exec the command.
        script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'
        return ["unshare", "-rm", "sh", "-c", script, "sh", str(folder)]
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    raise RuntimeError("cannot make a folder read-only here: needs user namespaces (unshare -rm) or a non-root user")


@pytest.mark.parametrize(
    ("stage", "folder", "failing"),
    [("prepare", "data/prepared", "data/prepared/val.h5"), ("baseline", "metrics", "metrics/bicubic.json")],
)
def test_read_only_output_folder_fails_clearly(workdir: Path, stage, folder, failing) -> None:
    before = hashes(workdir, [*OUTPUTS["prepare"], *OUTPUTS["baseline"]])
    wrap = read_only_wrapper(workdir / folder)
    try:
        result = run_stage(stage, workdir, wrap=wrap)
    finally:
        (workdir / folder).chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert f"{stage}: error: {failing}: Read-only file system" in result.stderr or (
        f"{stage}: error: {failing}: Permission denied" in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr
    assert hashes(workdir, [*OUTPUTS["prepare"], *OUTPUTS["baseline"]]) == before
    assert temp_files(workdir) == []


def test_read_only_raw_folder_fails_download_naming_each_file(workdir: Path, shared_datasets: Path) -> None:
    (workdir / "params.yaml").write_text(
        "download:\n  sets: [Set5]\n  workers: 2\n  retries: 0\n  timeout_s: 5\n"
    )
    shutil.rmtree(workdir / "data/raw/Set14")  # verified Set5 files stay; these two must be fetched
    (workdir / "data/raw/Set5/bird.png").unlink()
    (workdir / "data/raw/Set5/head.png").unlink()
    wrap = read_only_wrapper(workdir / "data/raw/Set5")
    env = {**os.environ, "VDSR_DATA_MIRROR": str(shared_datasets)}
    try:
        result = run_stage("download", workdir, wrap=wrap, env=env)
    finally:
        (workdir / "data/raw/Set5").chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "download: error: 2 of 2 file(s) failed" in result.stderr
    for name, source in (("bird", "img_002"), ("head", "img_004")):
        assert f"Set5/{name}.png: " in result.stderr and f"data/set5/{source}.png" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (workdir / "data/raw/Set5").iterdir()) == ["baby.png", "butterfly.png", "woman.png"]


def test_direct_rerun_removes_temporary_files_of_a_killed_run(workdir: Path) -> None:
    prepared = workdir / "data/prepared"
    for name in (".train.h5.k1ll3d.tmp", ".val.h5.k1ll3d.tmp"):  # what kill -9 leaves behind
        (prepared / name).write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(4096))
    result = run_stage("prepare", workdir)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in prepared.iterdir()) == ["train.h5", "val.h5"]

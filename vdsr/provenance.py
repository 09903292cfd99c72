"""Provenance: what produced a run or a model file, as plain string tags.

The git commit and whether the tracked files differ from it, the DVC experiment and the data
hashes DVC recorded in ``dvc.lock``, library versions and the compute device, and an id shared by
the stages of one pipeline run (:func:`pipeline_run_id`). Tag names follow MLflow's conventions
(``mlflow.source.git.commit`` is the one the MLflow UI shows); values are ``str``, as MLflow
stores them. Nothing here imports mlflow: :mod:`vdsr.tracking` logs these tags, and the model
card (:mod:`vdsr.model_card`) reads the data hashes. Host names and process ids never appear in
a tag; :func:`pipeline_run_id` hashes them.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import yaml

# dvc.lock stages whose data hashes identify the training data.
DATA_STAGES = ("download", "prepare")


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(repo_root), *args], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.rstrip()  # not strip(): porcelain lines start with a status column


def data_hashes(repo_root: Path, stages: tuple[str, ...] = DATA_STAGES) -> dict[str, str]:
    """``{"dvc.md5.<path>": md5}`` of the data deps/outs of ``stages`` in ``dvc.lock`` (code files skipped)."""
    lock_file = repo_root / "dvc.lock"
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    hashes: dict[str, str] = {}
    for stage in stages:
        entry = lock.get("stages", {}).get(stage) or {}
        for item in [*entry.get("deps", []), *entry.get("outs", [])]:
            path, md5 = item.get("path"), item.get("md5")
            if path and md5 and not path.endswith(".py"):  # code is covered by the git commit
                hashes[f"dvc.md5.{path}"] = str(md5)
    return hashes


def reproducibility_tags(repo_root: Path, device: Any = None) -> dict[str, str]:
    """Tags that say what produced a run: git commit and dirty flag, DVC experiment, data hashes,
    library versions and the compute device actually used (``device``; default: the CPU). Seeds
    are params, not tags."""
    import torch

    from vdsr.runtime import device_description

    repo_root = Path(repo_root)
    tags: dict[str, str] = {}
    commit = _git(repo_root, "rev-parse", "HEAD")
    if commit:
        # Tracked files only. DVC's uncached outputs (metrics/, plots/, models/mlflow_run.json),
        # dvc.lock and params.yaml (dvc exp run -S) are tracked too, so the changed paths are listed.
        status = _git(repo_root, "status", "--porcelain", "--untracked-files=no")
        tags["git.commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
        tags["git.dirty"] = "unknown" if status is None else str(bool(status)).lower()
        if status:
            changed = ", ".join(line[3:] for line in status.splitlines())
            tags["git.changed"] = changed if len(changed) <= 4000 else changed[:3990] + " ..."
    else:
        tags["git.commit"] = "unknown (not a git checkout)"
    for env, tag in (
        ("DVC_EXP_NAME", "dvc.exp_name"),
        ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
        ("DVC_STAGE", "dvc.stage"),
    ):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags.update(data_hashes(repo_root))
    tags["python.version"] = platform.python_version()
    tags["torch.version"] = torch.__version__
    tags["torch.cuda"] = torch.version.cuda or "none"
    if torch.cuda.is_available():
        tags["cudnn.version"] = str(torch.backends.cudnn.version())
    tags["device"] = device_description(torch.device(device or "cpu"))
    tags["platform"] = platform.platform()
    return tags


PIPELINE_RUN_ENV = "VDSR_PIPELINE_RUN_ID"  # set it to group runs under an id of your choosing


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks since boot) of a Linux process, from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...; starttime is field 22
    return int(fields[1]), fields[19]


def _is_dvc(pid: int) -> bool:
    """Whether process ``pid`` is a ``dvc`` command (``dvc repro``, ``python -m dvc``, a queue worker)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    words = [Path(arg.decode(errors="replace")).name for arg in argv[:3]]
    return "dvc" in words


def pipeline_run_id() -> str:
    """An id shared by the stages of one ``dvc repro`` / ``dvc exp run``, different for the next one.

    ``$VDSR_PIPELINE_RUN_ID`` if set; else derived from the nearest ancestor process that is a
    ``dvc`` command (its pid and start time: unique per invocation on a machine, and the same for
    every stage it runs, ``train@vdsr`` and ``train@srcnn`` alike); else (a stage run by hand, or
    not on Linux) a fresh random id. Logged as the tag ``pipeline.run_id``, so that the MLflow runs
    of one pipeline run can be grouped (``tags.`pipeline.run_id` = '...'``).
    """
    import uuid

    if os.environ.get(PIPELINE_RUN_ENV):
        return os.environ[PIPELINE_RUN_ENV]
    pid = os.getppid()
    for _ in range(32):  # a bounded walk up the process tree
        stat = _proc_stat(pid)
        if stat is None or pid <= 1:
            break
        if _is_dvc(pid):
            seed = f"{platform.node()}:{pid}:{stat[1]}"
            return "dvc-" + hashlib.sha256(seed.encode()).hexdigest()[:12]
        pid = stat[0]
    return "run-" + uuid.uuid4().hex[:12]

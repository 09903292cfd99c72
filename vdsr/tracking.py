"""MLflow tracking: where runs are stored, what they are tagged with, and a run that never stops training.

This is the only module that imports ``mlflow``.

Store. ``MLFLOW_TRACKING_URI`` wins when set. Otherwise runs go to ``sqlite:///<root>/mlflow.db``
with artifacts under ``<root>/mlartifacts``, where ``<root>`` is ``DVC_ROOT`` when DVC runs the
stage and the given ``repo_root`` otherwise. Since treeverse/dvc#9879 and #9918 (2023; we need
dvc >= 3.50) ``DVC_ROOT`` is the *user's* repository even in ``dvc exp run --temp`` and
``--queue``, whose stages run in a copy under ``<root>/.dvc/tmp/exps/`` (checked with dvc 3.67:
``DVC_ROOT=<repo>``, cwd ``<repo>/.dvc/tmp/exps/standalone/tmp...``); so runs from such
experiments land in the same store as workspace runs, and ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` in the
repository shows them all. (Should an older DVC hand over the copy itself, the path is cut back
to the directory above its ``.dvc/tmp/exps``.) The experiment is ``vdsr`` unless
``MLFLOW_EXPERIMENT_NAME`` says otherwise. Queued experiments may run side by side: the first
creation of the SQLite store is serialised by a file lock, and retried, because two processes
running MLflow's schema migrations at once fail with "table experiments already exists".

Failures. Tracking is a side channel: the DVC outputs (``metrics/``, ``plots/``, ``models/``)
are the record, so an unreachable server or a broken store must not cost a training run. Before
use, MLflow's HTTP retry budget (7 retries with exponential backoff and a 120 s timeout by
default: minutes per call against a dead server) is bounded by :data:`HTTP_DEFAULTS`, each only
if the user has not set it, and an HTTP server is probed once with a :data:`PROBE_TIMEOUT_S`
request. On any failure, at start or later, a :class:`Run` warns once, becomes a no-op
(``run_id`` None) and, when it ends, lists what was not logged.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import platform
import posixpath
import re
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "vdsr"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MODEL_NAME = "model"  # the artifact name of the logged MLflow model
# The experiment's kind, which decides the pages the MLflow 3 UI shows: "custom_model_development"
# opens on the training runs instead of the empty GenAI "Overview" with the logged model under
# "Agent versions". Values as in the UI's ExperimentKind enum (mlflow/server/js; also set by
# mlflow/demo/generators/traces.py). MLflow 3.17's UI follows its `workflowType` URL parameter
# instead (see :func:`dashboard_url`); the tag is for the 3.x versions before it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# Bounds on MLflow's HTTP client, applied only where the user has not set the variable. Measured
# for one call to a server lost mid-run: refused connection ~2.6 s, silent server ~3 x 10 s; with
# MLflow's defaults (7 retries, backoff factor 2, 120 s timeout) a refused connection takes ~245 s.
# The timeout is per socket read, so long artifact uploads that make progress still work.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
PROBE_TIMEOUT_S = 5.0  # one GET <uri>/health before the first MLflow call to an HTTP server
STORE_CREATE_ATTEMPTS = 5  # tries to open/create a SQLite store (after waiting for the lock)
SQLITE_BUSY_ATTEMPTS = 3  # tries of one logging call while another process holds the SQLite write lock

# dvc.lock stages whose data hashes identify the training data.
DATA_STAGES = ("download", "prepare")


# --- where runs are stored ----------------------------------------------------------------------


def store_root(repo_root: Path) -> Path:
    """The directory that holds the default store: ``DVC_ROOT`` when set, else ``repo_root``."""
    root = Path(os.environ.get("DVC_ROOT") or repo_root).resolve()
    parts = root.parts
    for i in range(len(parts) - 2):  # an experiment copy <root>/.dvc/tmp/exps/<tmp>: use <root>
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def default_tracking_uri(repo_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<store root>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(store_root(repo_root) / STORE_FILE).as_posix()}"


def experiment_name() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def bound_http_retries() -> None:
    """Set :data:`HTTP_DEFAULTS` in the environment, leaving the user's own settings alone."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _probe_http(uri: str, timeout_s: float | None = None) -> None:
    """Raise ``ConnectionError`` unless an HTTP server answers at ``uri`` within ``timeout_s``
    (default :data:`PROBE_TIMEOUT_S`). Any HTTP status counts as an answer (a proxy's 404 or an
    auth 401 are MLflow's to report).
    """
    timeout_s = PROBE_TIMEOUT_S if timeout_s is None else timeout_s
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        message = f"cannot reach the tracking server {uri} ({reason}; probe timeout {timeout_s:g} s)"
        raise ConnectionError(message) from None


@contextlib.contextmanager
def _store_lock(db_path: Path) -> Iterator[None]:
    """An inter-process lock per SQLite file, kept in the temp dir so that it never litters the repo."""
    from filelock import FileLock  # a dependency of torch

    digest = hashlib.sha1(str(db_path.resolve()).encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"vdsr-mlflow-{digest}.lock", timeout=120):
        yield


def _experiment_id(uri: str, name: str, artifact_root: Path | None) -> str:
    """Id of experiment ``name`` in the store at ``uri``, creating store and experiment if needed."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            location = artifact_root.as_uri() if artifact_root is not None else None
            tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            return client.create_experiment(name, artifact_location=location, tags=tags)
        except MlflowException as error:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise error
    if experiment.lifecycle_stage != "active":
        raise RuntimeError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or set MLFLOW_EXPERIMENT_NAME"
        )
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version or by hand; a kind chosen in the UI stays
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _open_store(uri: str, name: str, artifact_root: Path | None) -> str:
    """Reach the store (bounded) and return the experiment id; raises when it is unusable."""
    if uri.startswith(("http://", "https://")):
        bound_http_retries()
        _probe_http(uri)
        return _experiment_id(uri, name, None)
    db_path = _sqlite_path(uri)
    if db_path is None:
        return _experiment_id(uri, name, None)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, STORE_CREATE_ATTEMPTS + 1):
        try:
            with _store_lock(db_path):
                return _experiment_id(uri, name, artifact_root)
        except Exception as error:  # noqa: BLE001  (a migration racing a process without our lock)
            racing = "already exists" in str(error) or "database is locked" in str(error)
            if not racing or attempt == STORE_CREATE_ATTEMPTS:
                raise
            log.info("mlflow: store %s busy (%s), retrying", db_path, error)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


# --- what a run is tagged with ------------------------------------------------------------------


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": "0.1"}``; lists as their YAML-ish repr."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


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


def _system_metrics_available() -> bool:
    """MLflow's system metrics need psutil (an MLflow dependency); GPU ones also need nvidia-ml-py."""
    import importlib.util

    if importlib.util.find_spec("psutil") is None:
        log.info("mlflow: psutil is not installed, system metrics are not logged")
        return False
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda and importlib.util.find_spec("pynvml") is None:
        log.info("mlflow: nvidia-ml-py is not installed, GPU system metrics are not logged (CPU, memory are)")
    return True


# --- the run ------------------------------------------------------------------------------------


def _valid_metric_name(name: str) -> bool:
    """MLflow's rule (``mlflow.utils.validation``): ``[/\\w.\\- :]+`` that is its own normalised path."""
    if not re.fullmatch(r"[/\w.\- :]+", name):
        return False
    return posixpath.normpath(name) == name and name != "." and not name.startswith(("/", ".."))


class Run:
    """An MLflow run that turns into a no-op on the first failure instead of raising.

    ``run_id`` is None when tracking is unavailable. Also a context manager: ``end("FAILED")`` on
    an exception, ``end()`` otherwise.
    """

    def __init__(self, run_id: str | None, tracking_uri: str, *, reason: str | None = None) -> None:
        self.run_id = run_id
        self.started_run_id = run_id  # kept when tracking fails later: the partial run on the store
        self.tracking_uri = tracking_uri
        self.reason = reason  # why tracking is off, when it is
        self._not_logged: dict[str, int] = {}
        self._ended = False
        if run_id is None:
            self._warn_disabled()

    @property
    def active(self) -> bool:
        return self.run_id is not None and not self._ended

    def _warn_disabled(self) -> None:
        log.warning(
            "WARNING: MLflow tracking is off for this run: %s. The stage goes on; metrics, artifacts and "
            "the model are not logged to MLflow (store: %s) but are still written as DVC outputs.",
            self.reason,
            self.tracking_uri,
        )

    def _skip(self, what: str, count: int = 1) -> None:
        self._not_logged[what] = self._not_logged.get(what, 0) + count

    def _call(self, what: str, count: int, fn: Any, *args: Any, **kwargs: Any) -> None:
        if not self.active:
            self._skip(what, count)
            return
        for attempt in range(1, SQLITE_BUSY_ATTEMPTS + 1):
            try:
                fn(*args, **kwargs)
                return
            except Exception as error:  # noqa: BLE001  (tracking must never stop the stage)
                if "database is locked" in str(error) and attempt < SQLITE_BUSY_ATTEMPTS:
                    time.sleep(attempt)  # another queued experiment is writing to the same SQLite file
                    continue
                self._disable(f"logging {what} failed: {type(error).__name__}: {error}")
                self._skip(what, count)
                return

    def _disable(self, reason: str) -> None:
        """Turn into a no-op run: warn once, and let go of MLflow's process-wide state for the run
        without contacting the store again (it is what just failed)."""
        run_id, self.run_id, self.reason = self.run_id, None, reason
        self._warn_disabled()
        try:  # MLflow internals; at worst its atexit hook retries the (bounded) end of the run
            from mlflow.tracking import fluent

            stack = fluent._active_run_stack.get()
            if stack and stack[-1].info.run_id == run_id:
                stack.pop()
                os.environ.pop("MLFLOW_RUN_ID", None)
            monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
            if monitor is not None:
                monitor._shutdown_event.set()  # the sampling thread exits; no final flush
        except Exception:  # noqa: BLE001
            pass

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Log ``{name: value}`` at ``step``; names may hold ``/``, ``.``, ``-``, ``_``, ``:``, spaces."""
        bad = [key for key in metrics if not _valid_metric_name(key)]
        if bad:  # the caller's mistake: skip those, keep tracking on
            log.warning("WARNING: invalid MLflow metric name(s) %s not logged (allowed: letters, digits, "
                        "_ - . : / and spaces; no empty, '.', '..' or leading '/' parts)", bad)
            self._skip("metric values (bad names)", len(bad))
            metrics = {key: value for key, value in metrics.items() if key not in bad}

        def log_batch() -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(key, float(value), now, step or 0) for key, value in metrics.items()]
            self._client().log_batch(self.run_id, metrics=batch, synchronous=True)

        self._call("metric values", len(metrics), log_batch)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log ``params`` flattened to dotted keys (``train.lr``), in batches of 100 (MLflow's limit)."""

        def log_batch() -> None:
            from mlflow.entities import Param

            items = list(flatten_params(params).items())
            for start in range(0, len(items), 100):
                batch = [Param(key, value) for key, value in items[start : start + 100]]
                self._client().log_batch(self.run_id, params=batch, synchronous=True)

        self._call("params", len(flatten_params(params)), log_batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        def log_batch() -> None:
            from mlflow.entities import RunTag

            batch = [RunTag(key, str(value)) for key, value in tags.items()]
            self._client().log_batch(self.run_id, tags=batch, synchronous=True)

        self._call("tags", len(tags), log_batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents, under ``artifact_path`` of the run's artifacts."""
        path = Path(path)
        if not path.exists():  # the caller's mistake, not the store's: skip it, keep tracking on
            log.warning("WARNING: %s does not exist; not logged to MLflow", path)
            self._skip(f"artifact {path}")
            return

        def upload() -> None:
            client = self._client()
            if path.is_dir():
                client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                client.log_artifact(self.run_id, str(path), artifact_path)

        self._call(f"artifact {path}", 1, upload)

    def log_model(self, model: Any, input_example: np.ndarray) -> None:
        """Log ``model`` as the MLflow model ``model`` of this run (``mlflow.pytorch``, pt2 format).

        ``input_example``: float32 NCHW with N >= 2, so that the exported batch dimension is
        dynamic; height and width are declared dynamic in the signature. The model is copied to
        the CPU in eval mode first; the caller's model is not touched.
        """
        example = np.ascontiguousarray(input_example, dtype=np.float32)
        if example.ndim != 4 or example.shape[0] < 2:  # the caller's mistake: skip, keep tracking on
            log.warning("WARNING: input_example must be NCHW with N >= 2, got %s; model not logged", example.shape)
            self._skip("model")
            return

        def log_files() -> None:
            import mlflow
            import mlflow.pytorch
            import torch
            from mlflow.models import ModelSignature
            from mlflow.types import Schema, TensorSpec

            module = getattr(model, "_orig_mod", model)  # torch.compile's wrapper does not export
            cpu_model = copy.deepcopy(module).to("cpu").eval()
            channels = example.shape[1]
            signature = ModelSignature(
                inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))]),
                outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))]),
            )
            with self._activated():
                mlflow.pytorch.log_model(
                    cpu_model,
                    name=MODEL_NAME,
                    input_example=example,
                    signature=signature,
                    serialization_format="pt2",  # torch.export graph: loads without pickle
                    # Explicit requirements: inferring them loads the model in a subprocess (slow).
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
                )

        self._call("model", 1, log_files)

    @contextlib.contextmanager
    def _activated(self) -> Iterator[None]:
        """Make this run MLflow's active run in the process (``mlflow.pytorch`` logs to the active run)."""
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            yield
            return
        with mlflow.start_run(run_id=self.run_id, nested=active is not None):
            yield

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``status`` (FINISHED, FAILED, KILLED) and report anything that was not logged."""
        if self._ended:
            return
        if self.active:
            try:
                import mlflow

                active = mlflow.active_run()
                if active is not None and active.info.run_id == self.run_id:
                    mlflow.end_run(status)  # also stops the system-metrics thread
                else:
                    self._client().set_terminated(self.run_id, status)
                log.info("mlflow: run %s %s (%s)", self.run_id, status.lower(), self.tracking_uri)
            except Exception as error:  # noqa: BLE001
                self._disable(f"ending the run failed: {type(error).__name__}: {error}")
                self._skip(f"run status {status}")
        self._ended = True
        if self._not_logged:
            skipped = ", ".join(f"{n} {what}" if n > 1 else what for what, n in self._not_logged.items())
            log.warning("WARNING: not logged to MLflow (%s): %s", self.reason or "see the warnings above", skipped)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FAILED" if exc_type is not None else "FINISHED")


def start_run(*, repo_root: Path, params: dict, tags: dict[str, str], run_name: str | None = None) -> Run:
    """Start a run in experiment :func:`experiment_name` of the store :func:`default_tracking_uri`.

    Logs ``params`` flattened (``train.lr``), ``tags`` and system metrics (CPU, memory, GPU when
    nvidia-ml-py is installed). The run is named ``run_name``, else after the DVC experiment when
    there is one.
    Never raises for tracking problems: returns a no-op :class:`Run` and warns instead.
    """
    repo_root = Path(repo_root)
    uri = default_tracking_uri(repo_root)
    try:
        import mlflow

        artifact_root = None if os.environ.get("MLFLOW_TRACKING_URI") else store_root(repo_root) / ARTIFACTS_DIR
        experiment_id = _open_store(uri, experiment_name(), artifact_root)
        mlflow.set_tracking_uri(uri)
        active = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name or os.environ.get("DVC_EXP_NAME") or None,
            tags={key: str(value) for key, value in tags.items()},
            log_system_metrics=_system_metrics_available(),
            nested=mlflow.active_run() is not None,
        )
    except Exception as error:  # noqa: BLE001  (tracking must never stop training)
        run = Run(None, uri, reason=f"{type(error).__name__}: {error}")
        for what, count in (("params", len(flatten_params(params))), ("tags", len(tags))):
            if count:  # listed at the end with everything else that was not logged
                run._skip(what, count)
        return run
    run = Run(active.info.run_id, uri)
    run.log_params(params)
    log.info("mlflow: run %s in experiment %r (%s); dashboard %s", run.run_id, experiment_name(), uri,
             dashboard_url(uri, experiment_id, run.run_id))
    return run


def dashboard_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The page of a run (or of the experiment) in the MLflow UI, opened on model training.

    MLflow 3.17's UI picks GenAI or model-training pages from its ``workflowType`` URL parameter,
    then remembers it in the browser (earlier 3.x from the experiment's :data:`EXPERIMENT_KIND_TAG`).
    A SQLite store is shown by ``mlflow ui`` at its default address (README).
    """
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    page = f"/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/#{page}?workflowType=machine_learning"


def resume_run(
    *, repo_root: Path, run_id: str | None, tracking_uri: str | None = None, started_run_id: str | None = None
) -> Run:
    """Reopen run ``run_id`` (from the train stage) to add evaluation results; no-op Run if impossible."""
    uri = tracking_uri or default_tracking_uri(Path(repo_root))
    if run_id is None and started_run_id:
        reason = f"the train stage lost its MLflow run {started_run_id} mid-way (it holds the epochs logged before)"
        return Run(None, uri, reason=reason)
    if run_id is None:
        return Run(None, uri, reason="the train stage logged no MLflow run (run id is null)")
    try:
        import mlflow

        if uri.startswith(("http://", "https://")):
            bound_http_retries()
            _probe_http(uri)
        db_path = _sqlite_path(uri)
        if db_path is not None and not db_path.is_file():  # do not create an empty store
            raise FileNotFoundError(f"no MLflow store at {db_path}")
        mlflow.set_tracking_uri(uri)
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
    except Exception as error:  # noqa: BLE001
        return Run(None, uri, reason=f"cannot resume run {run_id}: {type(error).__name__}: {error}")
    log.info("mlflow: resumed run %s (%s)", run_id, uri)
    return Run(run_id, uri)

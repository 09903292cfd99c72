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
import json
import logging
import os
import posixpath
import re
import tempfile
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np

from vdsr.provenance import (  # tags of the runs started here
    pipeline_run_id,
    reproducibility_tags,
)

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
# The experiment's saved view, which the README's dashboard link opens (``?viewStateShareKey=set5``):
# the evaluated runs, best Set5 x2 PSNR first, with the model and Set5 PSNR x2/x3/x4 columns beside
# the run name and Duration (always shown). MLflow 3.17's UI keeps a view as the experiment tag
# ``mlflow.sharedViewState.<key>``: {"name", "createdAt", "updatedAt" (ms), "state"}, ``state`` a JSON
# string of the page's search facets and table state, as its "Save view" writes it and lists under
# "Views" (mlflow/server/js: the shared-view hooks; tests/test_experiment_docs.py checks the names).
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "set5"
VIEW_NAME = "Set5 PSNR"
VIEW_METRIC = "metrics.`eval/Set5/x2/psnr`"
VIEW_COLUMNS = ["params.`train.model`", VIEW_METRIC, "metrics.`eval/Set5/x3/psnr`", "metrics.`eval/Set5/x4/psnr`"]
VIEW_STATE = {
    "searchFilter": f"{VIEW_METRIC} > 0",  # not a report logged to a run of its own
    "orderByKey": VIEW_METRIC,
    "orderByAsc": False,
    "selectedColumns": VIEW_COLUMNS,
    "columnOrder": ["duration", *VIEW_COLUMNS],  # Duration: the grid's column of field "duration", no colId
    "columnWidths": {"duration": 80, VIEW_COLUMNS[0]: 90} | {column: 120 for column in VIEW_COLUMNS[1:]},
}

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
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<store root>/mlflow.db``.

    A user name and password in an HTTP(S) ``MLFLOW_TRACKING_URI`` (``http://user:token@host``)
    are moved to ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` of this process
    (:func:`_credentials_to_env`), so that neither MLflow nor this module ever sees them in a URI.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _credentials_to_env(os.environ["MLFLOW_TRACKING_URI"])
    return f"sqlite:///{(store_root(repo_root) / STORE_FILE).as_posix()}"


# --- URIs as they are stored and printed --------------------------------------------------------

OUTSIDE_REPO = "<outside the repository>"  # stands for the folders of a path outside the store root
_SECRET_QUERY_KEY = re.compile(r"token|secret|pass|pwd|key|auth|sig|cred", re.IGNORECASE)
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^\s/?#]*@")  # scheme://user:password@


def _credentials_to_env(uri: str) -> str:
    """``uri`` without its ``user:password@``, which go to ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (and the cleaned URI to ``MLFLOW_TRACKING_URI``) of this process.

    Only for HTTP(S) with both a user and a password: MLflow sends basic auth from those variables
    (``mlflow.utils.rest_utils``), and the URI's credentials win over ones already there, as they
    did when requests took them from the URI. A database URI (``postgresql://user:pw@host/db``)
    keeps them (SQLAlchemy needs them there); :func:`public_uri` takes them out of what is shown.
    A lone token (``http://token@host``) stays too, and MLflow is told not to print run URLs
    (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``), which would show it.
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    userinfo, _, host = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not (user and colon and password):
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        return uri
    clean = urllib.parse.urlunsplit(parts._replace(netloc=host))
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(user)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(password)
    os.environ["MLFLOW_TRACKING_URI"] = clean
    log.info("mlflow: the user name and password in MLFLOW_TRACKING_URI are sent as MLFLOW_TRACKING_USERNAME / "
             "MLFLOW_TRACKING_PASSWORD (set those instead of putting them in the URI: README)")
    return clean


def public_uri(uri: str | None, repo_root: Path | None = None) -> str | None:
    """``uri`` as it may be written to a committed file or a log line: the only form this project
    stores or prints. The one place that cleans URIs.

    - no user info (``user:password@`` of any scheme), and query values whose key looks like a
      secret (``token``, ``password``, ``key``, ``sig``...) as ``***``;
    - a local store's path (``sqlite:///...``, ``file:///...``, a plain path) relative to the store
      root (:func:`store_root` of ``repo_root``, default the working directory), which
      :func:`reachable_uri` resolves again: ``sqlite:///mlflow.db``; a path outside it as
      ``<outside the repository>/<file name>``.
    """
    if not uri:
        return uri
    root = store_root(Path.cwd() if repo_root is None else Path(repo_root))
    if uri.startswith("sqlite:///"):  # SQLAlchemy: sqlite:///relative.db, sqlite:////absolute.db
        path, mark, query = uri.removeprefix("sqlite:///").partition("?")
        if path.startswith("/"):
            path = _portable_path(path, root)
        return f"sqlite:///{path}" + (mark + _public_query(query) if mark else "")
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "file" or (not parts.scheme and uri.startswith("/")):
        path = urllib.parse.unquote(parts.path)
        if not path.startswith("/"):
            return uri
        return ("file:" if parts.scheme else "") + _portable_path(path, root)
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=_public_query(parts.query)))


def _portable_path(path: str, root: Path) -> str:
    """An absolute ``path`` relative to ``root`` when inside it, else ``<outside the repository>/<name>``."""
    absolute = Path(os.path.normpath(path))
    for base in dict.fromkeys((root, root.resolve())):
        if absolute.is_relative_to(base):
            return absolute.relative_to(base).as_posix()
    return f"{OUTSIDE_REPO}/{absolute.name}"


def _public_query(query: str) -> str:
    if not query:
        return query
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return urllib.parse.urlencode([(k, "***" if _SECRET_QUERY_KEY.search(k) else v) for k, v in pairs], safe="*")


def redact(text: str) -> str:
    """``text`` (an error message, a log line) with the user info of every URI in it taken out,
    and the password of ``MLFLOW_TRACKING_PASSWORD`` replaced by ``***`` wherever it appears."""
    text = _USERINFO.sub(r"\1", text)
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    return text.replace(password, "***") if password and len(password) >= 4 else text


def reachable_uri(stored: str | None, repo_root: Path) -> str:
    """The URI to reach the store that ``stored`` (a :func:`public_uri`, as written by the train
    stage) names, credentials from the environment.

    The current store (:func:`default_tracking_uri`) when ``stored`` is its public form, or when
    nothing is stored; a relative local path resolved against the store root; an HTTP(S) URI as it
    is (MLflow adds ``MLFLOW_TRACKING_USERNAME`` / ``PASSWORD``); an older file's absolute URI as it
    is. Raises ``ValueError`` for a store outside the repository that is not the current one.
    """
    repo_root = Path(repo_root)
    current = default_tracking_uri(repo_root)
    if not stored or public_uri(current, repo_root) == stored:
        return current
    if OUTSIDE_REPO in stored:
        raise ValueError(f"the run was logged to a store outside the repository ({stored}), and MLFLOW_TRACKING_URI "
                         f"names another one ({public_uri(current, repo_root)}); set it to that store")
    root = store_root(repo_root)
    if stored.startswith("sqlite:///") and not stored.startswith("sqlite:////"):
        path, mark, query = stored.removeprefix("sqlite:///").partition("?")
        return f"sqlite:///{(root / path).as_posix()}{mark}{query}"
    if stored.startswith("file:") and not stored.startswith("file:/"):
        return (root / stored.removeprefix("file:")).as_uri()
    if ":" not in stored and not stored.startswith("/"):  # a plain relative path (a file store)
        return (root / stored).as_posix()
    return stored


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
    url = _USERINFO.sub(r"\1", uri).rstrip("/") + "/health"  # urllib would take user info for the host
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        message = f"cannot reach the tracking server {public_uri(uri)} ({reason}; probe timeout {timeout_s:g} s)"
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
            tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, **experiment_view()}
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
    # made by an older version or by hand: the tags added; a kind chosen or a view edited in the UI stays
    for key, value in {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, **experiment_view()}.items():
        if key not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def experiment_view(now_ms: int | None = None) -> dict[str, str]:
    """The experiment tag of the saved view :data:`VIEW_STATE` (see :data:`VIEW_KEY`): key to value."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    envelope = {"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(VIEW_STATE)}
    return {SHARED_VIEW_TAG_PREFIX + VIEW_KEY: json.dumps(envelope)}


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
        except Exception as error:
            racing = "already exists" in str(error) or "database is locked" in str(error)
            if not racing or attempt == STORE_CREATE_ATTEMPTS:
                raise
            log.info("mlflow: store %s busy (%s), retrying", db_path, error)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


# --- what a run is tagged with (provenance: vdsr.provenance) ------------------------------------------------------------------


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


def _save_portable_pytorch_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
    """``mlflow.pytorch.save_model`` into ``path`` (a temporary folder of ``Model.log``, before the
    upload), then without this machine's paths: the ``torch.export`` graph keeps each node's
    ``stack_trace`` (absolute paths of torch in the venv and of ``vdsr/models.py``): dropped, and
    MLmodel's ``artifact_path`` (the store's folder, ``file:///...``, for a local store): left out.
    """
    import mlflow.pytorch
    import torch
    from mlflow.utils.file_utils import get_total_file_size

    mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    pt2 = Path(path) / "data" / "model.pt2"
    program = torch.export.load(pt2)  # the file just written here
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)
    with tempfile.TemporaryDirectory(dir=pt2.parent) as tmp:
        torch.export.save(program, Path(tmp) / pt2.name)
        os.replace(Path(tmp) / pt2.name, pt2)
    location = str(mlflow_model.artifact_path or "")
    if location.startswith(("file:", "/")):
        mlflow_model.artifact_path = None  # MLflow leaves the key out (Model.to_dict)
    mlflow_model.model_size_bytes = get_total_file_size(path)
    mlflow_model.save(str(Path(path) / "MLmodel"))


# The flavor that :meth:`Run.log_model` hands to ``mlflow.models.Model.log``: its files are
# mlflow.pytorch's, loaded by mlflow.pytorch (MLmodel says so), without absolute paths.
PORTABLE_PYTORCH = types.SimpleNamespace(__name__="mlflow.pytorch", save_model=_save_portable_pytorch_model)


def _valid_metric_name(name: str) -> bool:
    """MLflow's rule (``mlflow.utils.validation``): ``[/\\w.\\- :]+`` that is its own normalised path."""
    if not re.fullmatch(r"[/\w.\- :]+", name):
        return False
    return posixpath.normpath(name) == name and name != "." and not name.startswith(("/", ".."))


class BestEffortRun:
    """An MLflow run that turns into a no-op on the first failure instead of raising: its
    lifecycle and that failure policy (:meth:`_call`); :class:`Run` adds what a stage logs.

    ``run_id`` is None when tracking is unavailable. Also a context manager: ``end("FAILED")`` on
    an exception (``end()`` for a run ``reopened`` by a later stage: its failure is not the
    training's), ``end()`` otherwise.

    ``tracking_uri`` is the store's :func:`public_uri` (no credentials, no machine path): what
    callers write to files and logs. The URI used to reach the store stays private.
    """

    def __init__(self, run_id: str | None, tracking_uri: str, *, reason: str | None = None,
                 reopened: bool = False, repo_root: Path | None = None) -> None:
        self.run_id = run_id
        self.started_run_id = run_id  # kept when tracking fails later: the partial run on the store
        self._uri = tracking_uri
        self._root = repo_root
        self.reopened = reopened  # an earlier stage's run, continued
        self.reason = None if reason is None else redact(reason)  # why tracking is off, when it is
        self._not_logged: dict[str, int] = {}
        self._ended = False
        if run_id is None:
            self._warn_disabled()

    @property
    def tracking_uri(self) -> str:
        """The store, as it may be written to a committed file or printed (:func:`public_uri`)."""
        return public_uri(self._uri, self._root)

    @tracking_uri.setter
    def tracking_uri(self, uri: str) -> None:
        self._uri = uri

    def record(self) -> dict[str, str | None]:
        """``{"run_id", "started_run_id", "tracking_uri"}``, the form of ``models/<name>.mlflow_run.json``."""
        return {"run_id": self.run_id, "started_run_id": self.started_run_id, "tracking_uri": self.tracking_uri}

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
        run_id, self.run_id, self.reason = self.run_id, None, redact(reason)
        self._warn_disabled()
        try:  # public API: end_run pops the run first, then marks it on the store (bounded, may fail)
            import mlflow

            active = mlflow.active_run()
            if active is not None and active.info.run_id == run_id:
                mlflow.end_run("FAILED")  # also stops the system-metrics thread when the store answers
        except Exception:  # noqa: BLE001, S110  (the store just failed; the run's record stays as it is)
            pass  # a system-metrics thread stops by itself when it cannot read the run

    def _client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self._uri)

    @contextlib.contextmanager
    def _activated(self) -> Iterator[None]:
        """Make this run MLflow's active run in the process (``mlflow.pytorch`` logs to the active run)."""
        import mlflow

        mlflow.set_tracking_uri(self._uri)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FAILED" if exc_type is not None and not self.reopened else "FINISHED")


class Run(BestEffortRun):
    """What a stage logs to its run: metrics, params, tags, artifacts and the model, each skipped
    (and counted, for the warning at :meth:`end`) once tracking is off."""

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
            with self._activated():
                log_pt2_model(model, example)

        self._call("model", 1, log_files)


def log_pt2_model(model: Any, example: np.ndarray) -> None:
    """Log ``model`` as the MLflow model :data:`MODEL_NAME` of the active run (``mlflow.pytorch``'s
    layout, pt2 format: a torch.export graph that loads without pickle), on the CPU, in eval mode,
    from a copy; ``example`` float32 NCHW with N >= 2, height and width dynamic in the signature."""
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
    mlflow.models.Model.log(  # what mlflow.pytorch.log_model does, with PORTABLE_PYTORCH for the files
        artifact_path=None,
        name=MODEL_NAME,
        flavor=PORTABLE_PYTORCH,
        flavor_name="mlflow.pytorch",
        pytorch_model=cpu_model,
        pickle_module=mlflow.pytorch.pickle_module,  # named in MLmodel; pt2 itself has no pickle
        input_example=example,
        signature=signature,
        serialization_format="pt2",  # torch.export graph: loads without pickle
        # Explicit requirements: inferring them loads the model in a subprocess (slow).
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
    )


def run_name(model: str, stage: str = "train", experiment: str | None = None) -> str:
    """The name of a run: the model first, then the DVC experiment, then the stage unless it is
    the training: ``vdsr smoke-1202``, ``srcnn smoke-1202 report``, ``vdsr`` (the workspace's
    training). ``experiment`` defaults to ``$DVC_EXP_NAME``. The model leads so that the runs of
    one experiment differ in the first characters the MLflow UI shows of a name."""
    if experiment is None:
        experiment = os.environ.get("DVC_EXP_NAME") or None
    return " ".join(part for part in (model, experiment, None if stage == "train" else stage) if part)


def start_run(*, repo_root: Path, params: dict, tags: dict[str, str], run_name: str | None = None,
              tracking_uri: str | None = None) -> Run:
    """Start a run in experiment :func:`experiment_name` of the store :func:`default_tracking_uri`
    (or ``tracking_uri``, a URI to reach: :func:`reachable_uri`).

    Logs ``params`` flattened (``train.lr``), ``tags`` and system metrics (CPU, memory, GPU when
    nvidia-ml-py is installed). The run is named ``run_name``, else after the DVC experiment when
    there is one.
    Never raises for tracking problems: returns a no-op :class:`Run` and warns instead.
    """
    repo_root = Path(repo_root)
    uri = tracking_uri or default_tracking_uri(repo_root)
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
        run = Run(None, uri, reason=f"{type(error).__name__}: {error}", repo_root=repo_root)
        for what, count in (("params", len(flatten_params(params))), ("tags", len(tags))):
            if count:  # listed at the end with everything else that was not logged
                run._skip(what, count)
        return run
    run = Run(active.info.run_id, uri, repo_root=repo_root)
    run.log_params(params)
    log.info("mlflow: run %s in experiment %r (%s); dashboard %s (the evaluated runs: %s)", run.run_id,
             experiment_name(), run.tracking_uri, dashboard_url(run.tracking_uri, experiment_id, run.run_id),
             dashboard_url(run.tracking_uri, experiment_id))
    return run


class TrainingChain:
    """The chain of MLflow runs of one training, run after resumed run, kept in its checkpoint.

    Callbacks of :func:`vdsr.train.train`: :meth:`started` (``on_start``) tags the run with what it
    continues (the run before it, or the release it was warm-started from) and extends
    :attr:`runs`, the runs of this training oldest first, which :attr:`extra` (``checkpoint_extra``)
    carries into the checkpoint as ``mlflow_runs`` (``mlflow_run_id``: this run); :meth:`log_epoch`
    (``on_epoch_end``) logs an epoch's history row as metrics at step ``epoch``.
    """

    def __init__(self, run: Run, checkpoint: Path) -> None:
        self.run, self.checkpoint = run, checkpoint
        this_run = run.run_id or run.started_run_id
        self.extra: dict[str, Any] = {"mlflow_run_id": this_run, "mlflow_runs": [this_run]}

    @property
    def runs(self) -> list[str | None]:
        return self.extra["mlflow_runs"]

    def started(self, position: Any, extra: dict[str, Any]) -> None:
        """``position`` (a :class:`vdsr.checkpoints.Position`) and ``extra`` of the checkpoint read."""
        resumed = bool(position.epoch or position.step)
        if extra.get("warm_start", {}).get("new_cycle") and not resumed:
            warm = extra["warm_start"]
            self.run.set_tags({"warm_start": f"{warm['from']} (sha256 {warm['sha256'][:12]}) at {warm['at']}",
                               "mlflow.note.content": f"A new cycle from the weights of {warm['from']}."})
        if resumed:  # say which run this one continues
            earlier = extra.get("mlflow_run_id") or "unknown"
            # every run of the chain, oldest first (checkpoints before this key: the last one only)
            self.extra["mlflow_runs"] = [*extra.get("mlflow_runs", [earlier]), self.extra["mlflow_run_id"]]
            self.run.set_tags({"resumed_from": str(position), "resumed_from_epoch": str(position.epoch),
                               "continues_run": earlier,
                               "mlflow.note.content": f"Continues run {earlier} from {self.checkpoint} after {position}."})

    def log_epoch(self, epoch: int, row: dict[str, float]) -> None:
        self.run.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=epoch)

    def log_earlier_epochs(self, rows: list[dict[str, float]]) -> None:
        """The epochs of the runs this one resumed, logged to this run too."""
        for row in rows:
            self.log_epoch(int(row["epoch"]), row)


@contextlib.contextmanager
def training_run(*, repo_root: Path, params: dict[str, Any], model: str, tags: dict[str, str],
                 checkpoint: Path) -> Iterator[tuple[Run, TrainingChain]]:
    """The MLflow run of training ``model`` (:func:`start_run`, named :func:`run_name`) and the
    :class:`TrainingChain` it continues from ``checkpoint``; ended when the block ends (FAILED on
    an error). Logs ``params`` (all of params.yaml, as given) with this model's section as
    ``train.<key>`` and the other stages' sections, not the other models'."""
    run_params = {**{key: value for key, value in params.items() if key != "train"}, "train": params["train"][model]}
    with start_run(repo_root=repo_root, params=run_params, tags=tags, run_name=run_name(model)) as run:
        yield run, TrainingChain(run, checkpoint)


def dashboard_url(uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The page of a run in the MLflow UI, or without ``run_id`` the experiment's saved view
    (:data:`VIEW_KEY`: the evaluated runs, best Set5 x2 first, model and Set5 PSNR columns), opened
    on model training.

    MLflow 3.17's UI picks GenAI or model-training pages from its ``workflowType`` URL parameter,
    then remembers it in the browser (earlier 3.x from the experiment's :data:`EXPERIMENT_KIND_TAG`).
    A SQLite store is shown by ``mlflow ui`` at its default address (README). ``uri``'s user
    info is left out (:func:`public_uri`).
    """
    uri = public_uri(uri) or ""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    if run_id:
        return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"


def _no_run(run_id: str | None, started_run_id: str | None, uri: str, repo_root: Path) -> Run | None:
    """The no-op Run for a train stage that left no run to continue, else None."""
    if run_id is None and started_run_id:
        reason = f"the train stage lost its MLflow run {started_run_id} mid-way (it holds the epochs logged before)"
        run = Run(None, uri, reason=reason, repo_root=repo_root)
        run.started_run_id = started_run_id  # handed on (results/<name>.json), so the report says the same
        return run
    if run_id is None:
        return Run(None, uri, reason="the train stage logged no MLflow run (run id is null)", repo_root=repo_root)
    return None


def _check_store(uri: str) -> None:
    """Raise unless the store at ``uri`` can be reached (bounded) and exists; never creates one."""
    if uri.startswith(("http://", "https://")):
        bound_http_retries()
        _probe_http(uri)
    db_path = _sqlite_path(uri)
    if db_path is not None and not db_path.is_file():  # do not create an empty store
        raise FileNotFoundError(f"no MLflow store at {public_uri(uri)}")


def _reopen(run_id: str, uri: str, repo_root: Path) -> Run:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
    run = Run(run_id, uri, reopened=True, repo_root=repo_root)
    log.info("mlflow: resumed run %s (%s)", run_id, run.tracking_uri)
    return run


def resume_run(
    *, repo_root: Path, run_id: str | None, tracking_uri: str | None = None, started_run_id: str | None = None
) -> Run:
    """Reopen run ``run_id`` whatever it holds; no-op Run if impossible. The stages use
    :func:`continue_run`, which reopens only a run of this experiment."""
    repo_root = Path(repo_root)
    stored = tracking_uri or default_tracking_uri(repo_root)
    missing = _no_run(run_id, started_run_id, stored, repo_root)
    if missing is not None:
        return missing
    try:
        uri = reachable_uri(tracking_uri, repo_root)
        _check_store(uri)
        return _reopen(run_id, uri, repo_root)
    except Exception as error:  # noqa: BLE001
        return Run(None, stored, reason=f"cannot resume run {run_id}: {type(error).__name__}: {error}", repo_root=repo_root)


# Tags of a training run that the model card shows (:func:`run_summaries`).
SUMMARY_TAGS = ("git.commit", "dvc.exp_name", "runtime.device", "runtime.precision", "runtime.channels_last",
                "torch.version", "platform", "resumed_from", "stopped_after")


def run_summaries(repo_root: Path, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    """What the store :func:`default_tracking_uri` (``MLFLOW_TRACKING_URI``, else the repository's
    ``mlflow.db``) knows of ``run_ids``: ``{run_id: {"start", "end" (ms since the epoch), "status",
    "name", and the :data:`SUMMARY_TAGS` it has}}``; runs it does not hold are left out. No store
    (none there, or unreachable): ``{}``; never creates one. The card's one read of MLflow."""
    if not run_ids:
        return {}
    uri = default_tracking_uri(Path(repo_root))
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        _check_store(uri)
    except Exception as error:  # noqa: BLE001  (a card without run times, not a failed release)
        log.info("mlflow: no run details from %s (%s)", public_uri(uri, repo_root), redact(str(error)))
        return {}
    client, found = MlflowClient(uri), {}
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        tags = run.data.tags
        found[run_id] = {"start": run.info.start_time, "end": run.info.end_time, "status": run.info.status,
                         "name": run.info.run_name, **{key: tags[key] for key in SUMMARY_TAGS if key in tags}}
    return found


def _describe_experiment(name: str | None) -> str:
    return f"DVC experiment {name!r}" if name else "the workspace (no DVC experiment)"


def _foreign(run: Any, stage: str, pipeline_id: str, model_run_id: str | None) -> str | None:
    """Why ``run`` is not this experiment's to add the results of ``stage`` to; None when it is."""
    tags, run_id = run.data.tags, run.info.run_id
    here, there = os.environ.get("DVC_EXP_NAME") or None, run.data.tags.get("dvc.exp_name") or None
    if model_run_id and model_run_id != run_id:
        return f"the model file was trained in run {model_run_id}, not in run {run_id}"
    if here != there:
        return f"run {run_id} belongs to {_describe_experiment(there)}, not to {_describe_experiment(here)}"
    done = tags.get(f"pipeline.{stage}.run_id")
    if done and done != pipeline_id:
        return f"run {run_id} already holds the {stage} results of pipeline run {done}"
    return None


def continue_run(*, repo_root: Path, run_info: dict[str, Any], stage: str, model: str, params: dict | None = None,
                 model_run_id: str | None = None, device: Any = None) -> Run:
    """The run that stage ``stage`` (``evaluate``, ``report``) of model ``model`` logs to.

    ``run_info``: ``{"run_id", "started_run_id", "tracking_uri"}`` of the run before (the train
    stage's ``models/<name>.mlflow_run.json``, or the ``mlflow_run`` of ``results/<name>.json``).
    That run is reopened only when it is this experiment's and holds nothing of this stage yet:
    its ``dvc.exp_name`` tag is ``$DVC_EXP_NAME`` (neither set: the workspace), its tag
    ``pipeline.<stage>.run_id`` is unset or this pipeline run's (:func:`pipeline_run_id`), and,
    when ``model_run_id`` (the run recorded in the model file) is given, it is that run. It then
    gets that tag. Otherwise one log line says why and a new run is started in the same store,
    named :func:`run_name` (``<model> [<experiment>] <stage>``), with that run's params plus ``params``, the
    :func:`reproducibility_tags` and ``stage``, ``pipeline.model``, ``pipeline.run_id``,
    ``pipeline.<stage>.run_id`` and ``pipeline.source_run_id`` (the run it did not reopen): so a
    DVC experiment that skipped a model's stages never rewrites another experiment's run.
    No run before (``run_id`` null): a no-op Run that says so. Never raises for tracking problems.
    """
    repo_root = Path(repo_root)
    run_id, stored = run_info.get("run_id"), run_info.get("tracking_uri")
    missing = _no_run(run_id, run_info.get("started_run_id"), stored or default_tracking_uri(repo_root), repo_root)
    if missing is not None:
        return missing
    pipeline_id = pipeline_run_id()
    try:
        from mlflow.tracking import MlflowClient

        uri = reachable_uri(stored, repo_root)
        _check_store(uri)
        before = MlflowClient(uri).get_run(run_id)
        reason = _foreign(before, stage, pipeline_id, model_run_id)
        if reason is None:
            MlflowClient(uri).set_tag(run_id, f"pipeline.{stage}.run_id", pipeline_id)
            return _reopen(run_id, uri, repo_root)
    except Exception as error:  # noqa: BLE001
        return Run(None, stored or "", reason=f"cannot resume run {run_id}: {type(error).__name__}: {error}",
                   repo_root=repo_root)
    log.info("mlflow: %s: starting a new run for the %s of %s", reason, stage, model)
    tags = {**reproducibility_tags(repo_root, device), "stage": stage, "pipeline.model": model,
            "pipeline.run_id": pipeline_id, f"pipeline.{stage}.run_id": pipeline_id, "pipeline.source_run_id": run_id,
            "mlflow.note.content": f"The {stage} of {model}: {reason}, which is left as it was."}
    run_params = {**before.data.params, **flatten_params(params or {})}
    return start_run(repo_root=repo_root, params=run_params, tags=tags, run_name=run_name(model, stage),
                     tracking_uri=uri)

"""Test helpers for MLflow end to end: the tiny pipeline, a real ``mlflow server`` and its REST API.

Not a test module. Its fixtures (``tiny_repo``, ``tracking_server``) come with
``pytest_plugins = ["mlflow_server"]`` in a test module; the rest is imported::

    from mlflow_server import TINY, MlflowServer, rest

``TINY`` is the params override for ``pipeline_repo`` (tests/conftest.py) that runs the whole
pipeline, download to evaluate, in well under a minute on a CPU: Set14 as training set, Set5 for
validation and evaluation, x2 only, a 3-layer 8-channel VDSR trained 2 x 10 steps with Adam.

:class:`MlflowServer` starts ``mlflow server`` on a free 127.0.0.1 port with a SQLite store and a
local artifact folder, in its own process group, waits for ``/health`` (bounded) and stops the
whole group. ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` and one worker keep it at 2 processes
and about 0.5 GB instead of 10 and 2.4 GB.

PYTEST_DONT_REWRITE: test modules import this one before pytest loads it as a plugin; its failures
are raised with their own messages.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import abort_with_stacks, with_faulthandler

TINY: dict[str, dict] = {
    "download": {"sets": ["Set5", "Set14"], "workers": 4},
    "prepare": {"train_sets": ["Set14"], "val_set": "Set5", "scales": [2], "downsizing": [1.0], "workers": 1},
    "baseline": {"sets": ["Set5"], "scales": [2, 4]},
    # one model (vdsr): one MLflow run per pipeline run; None removes the srcnn section
    "train": {"vdsr": {"depth": 3, "width": 8, "optimizer": "adam", "lr": 1.0e-3, "epochs": 2, "steps_per_epoch": 10,
                       "batch_size": 16, "lr_step_epochs": 20, "device": "cpu"}, "srcnn": None},
    "evaluate": {"sets": ["Set5"], "scales": [2, 4]},
}

CHROMIUM_TIMEOUT_S = 120
SERVER_START_TIMEOUT_S = 90.0  # ~10-15 s on an idle 2-core machine; more when tests share it


@pytest.fixture
def tiny_repo(pipeline_repo):
    """Factory: ``tiny_repo(**section_overrides)`` -> (repo, env), a fresh git + DVC repository of
    the pipeline with :data:`TINY` params, merged with the overrides (``train={"vdsr": {"epochs": 6}}``)."""
    import copy

    from conftest import merge_params

    def make(**overrides: dict) -> tuple[Path, dict[str, str]]:
        params = copy.deepcopy(TINY)
        merge_params(params, overrides)
        return pipeline_repo(params)

    return make


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default os.environ) without outside MLflow/DVC run settings, with telemetry off."""
    env = dict(os.environ if env is None else env)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(name, None)
    env.update({"DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    return env


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with ``sqlite:///<folder>/mlflow.db`` and artifacts
    proxied to ``<folder>/artifacts``. Use as a context manager or call :meth:`stop`.

    With ``admin_password``: MLflow's basic authentication (``--app-name basic-auth``, as the
    shared-server recipe of docs/mlflow.md), its user store in ``<folder>/basic_auth.db``, user ``admin``
    with that password, ``default_permission = EDIT``; every request but ``/health`` then needs
    credentials (HTTP 401 without). Needs Flask-WTF (the dev extra).
    """

    def __init__(self, folder: Path, *, port: int | None = None, timeout_s: float = SERVER_START_TIMEOUT_S,
                 admin_password: str | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.folder / "server.log"
        env = clean_env()
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner (huey) workers
        mlflow = Path(sys.executable).parent / "mlflow"
        command = [
            str(mlflow), "server",
            "--backend-store-uri", f"sqlite:///{(self.folder / 'mlflow.db').as_posix()}",
            "--artifacts-destination", (self.folder / "artifacts").as_uri(),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        if admin_password is not None:
            import secrets

            config = self.folder / "basic_auth.ini"
            config.write_text(
                "[mlflow]\ndefault_permission = EDIT\nadmin_username = admin\n"  # as docs/mlflow.md's recipe
                f"database_uri = sqlite:///{(self.folder / 'basic_auth.db').as_posix()}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            env.update({"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
                        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)})
            command += ["--app-name", "basic-auth"]
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(command, cwd=self.folder, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        started = time.monotonic()
        try:
            self._wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.start_s = time.monotonic() - started

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"mlflow server not healthy at {self.url} after {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server's process group at once (a crash, as seen by its clients)."""
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait(timeout=30)
        self._signal(signal.SIGKILL)  # workers that outlived their parent, if any
        self._log.close()

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)  # the group is the server's own (start_new_session)

    def __enter__(self) -> MlflowServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def tracking_server(tmp_path: Path):
    """A running :class:`MlflowServer` in ``tmp_path/mlflow-server``; stopped after the test."""
    server = MlflowServer(tmp_path / "mlflow-server")
    print(f"mlflow server {server.url} healthy in {server.start_s:.1f} s")
    yield server
    server.stop()


def rest(base_url: str, endpoint: str, query: dict | None = None, body: dict | None = None,
         timeout_s: float = 10.0, auth: tuple[str, str] | None = None) -> dict:
    """GET (or POST ``body`` as JSON) ``<base_url>/api/2.0/mlflow/<endpoint>``; the decoded JSON.
    ``auth``: (user, password) sent as HTTP basic authentication."""
    import base64

    url = f"{base_url.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query, doseq=True)
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def list_artifacts(base_url: str, run_id: str, path: str = "") -> list[str]:
    """All artifact file paths of a run, recursively, through the REST API."""
    query = {"run_id": run_id, **({"path": path} if path else {})}
    files: list[str] = []
    for entry in rest(base_url, "artifacts/list", query).get("files", []):
        if entry.get("is_dir"):
            files += list_artifacts(base_url, run_id, entry["path"])
        else:
            files.append(entry["path"])
    return files


class Streamed:
    """A command run in its own process group whose merged stdout/stderr lines are collected,
    each with its time since the start, by a reader thread (so the test can watch and act)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        import threading

        self.args = args
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.process = subprocess.Popen(args, cwd=cwd, env=with_faulthandler(env), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def find(self, pattern: str, start: int = 0) -> int | None:
        """Index in :attr:`lines` of the first line from ``start`` on that matches regex ``pattern``."""
        import re

        lines = list(self.lines)
        return next((i for i in range(start, len(lines)) if re.search(pattern, lines[i][1])), None)

    def first(self, pattern: str, start: int = 0) -> tuple[float, str] | None:
        """The first (time, line) from index ``start`` on that matches regex ``pattern``."""
        index = self.find(pattern, start)
        return None if index is None else self.lines[index]

    def wait_for(self, pattern: str, timeout_s: float) -> tuple[float, str]:
        """Block until a line matches ``pattern``; fail with the output on timeout or early exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.first(pattern)
            if found is not None:
                return found
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                found = self.first(pattern)
                if found is not None:
                    return found
                raise AssertionError(f"{' '.join(self.args)} exited {self.process.returncode} before "
                                     f"printing {pattern!r}:\n{self.output[-6000:]}")
            time.sleep(0.05)
        self.kill(stacks=True)
        raise AssertionError(f"no {pattern!r} within {timeout_s:g} s from {' '.join(self.args)}; stacks "
                             f"(faulthandler) and output:\n{self.output[-12000:]}")

    def wait(self, timeout_s: float) -> int:
        """The exit status; on timeout the process group is killed and the test fails."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill(stacks=True)
            raise AssertionError(f"{' '.join(self.args)} ran over {timeout_s:g} s; stacks (faulthandler) and "
                                 f"output:\n{self.output[-12000:]}") from None
        self._reader.join(timeout=10)
        return self.process.returncode

    def check(self, timeout_s: float) -> Streamed:
        """:meth:`wait` and fail with the output unless the exit status is 0."""
        code = self.wait(timeout_s)
        if code != 0:
            raise AssertionError(f"{' '.join(self.args)} exited {code}:\n{self.output[-8000:]}")
        return self

    def kill(self, stacks: bool = False) -> None:
        """SIGKILL the process group; with ``stacks``, SIGABRT it first so its Python processes print their stacks."""
        if stacks:
            abort_with_stacks(self.process)
            self._reader.join(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def __enter__(self) -> Streamed:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:  # a test that failed half-way: leave nothing running
            self.kill()


def stage_lines(streamed: Streamed, stage: str) -> list[tuple[float, str]]:
    """The (time, line) pairs of DVC stage ``stage`` in a ``dvc repro`` output: from its "Running
    stage" line to the lock-file update that ends it."""
    start = streamed.find(rf"^Running stage '{stage}'")
    assert start is not None, f"stage {stage} did not run:\n{streamed.output[-6000:]}"
    end = streamed.find(r"lock file 'dvc.lock'", start)
    assert end is not None, f"stage {stage} did not finish:\n{streamed.output[-6000:]}"
    return streamed.lines[start : end + 1]


def stage_seconds(streamed: Streamed, stage: str) -> float:
    lines = stage_lines(streamed, stage)
    return lines[-1][0] - lines[0][0]


def stage_output(streamed: Streamed, stage: str) -> str:
    return "\n".join(line for _, line in stage_lines(streamed, stage))


# --- the dashboard as a browser shows it --------------------------------------------------------------

def chromium() -> str:
    """The Chromium binary; a missing one fails the test (CI installs it: docs/install.md, "For the tests")."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to check the MLflow dashboard and is not installed: "
                "apt-get install -y chromium (Debian/Ubuntu)", pytrace=False)


def open_page(url: str, workdir: Path, screenshot: Path, window: tuple[int, int] = (1400, 1000)) -> str:
    """Load ``url`` in headless Chromium (loopback only, no Google services) in a ``window`` of
    width x height pixels, save a screenshot and return the DOM after 15 s of virtual time (the
    MLflow UI renders client-side)."""
    args = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={workdir / 'chromium-profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=15000", f"--window-size={window[0]},{window[1]}", f"--screenshot={screenshot}", "--dump-dom", url,
    ]
    done = subprocess.run(args, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_S)
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done.stdout


def visible_text(dom: str) -> str:
    """The text of a DOM as a reader sees it: no scripts or styles, tags and runs of white space as one space."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.DOTALL)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def keep_artifact(path: Path) -> Path:
    """Copy a file worth looking at after the run to $VDSR_TEST_ARTIFACTS, when set."""
    folder = os.environ.get("VDSR_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copy2(path, Path(folder) / path.name))
    print(f"test artifact: {path}")
    return path

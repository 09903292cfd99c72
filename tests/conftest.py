"""Shared test fixtures. Tests talk to 127.0.0.1 only and never phone home."""

from __future__ import annotations

import os
import sys
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


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random VDSR of depth 3, width 4 (test_upscale.tiny_model): for runs whose model
    does not matter, only that one is loaded and applied."""
    from test_upscale import tiny_model

    from vdsr.models import ModelConfig, save_model

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(path, tiny_model(), ModelConfig("vdsr", 3, 4), {"note": "test"})
    return path


@pytest.fixture(scope="session")
def set5_dir(tmp_path_factory: pytest.TempPathFactory, shared_datasets: Path) -> Path:
    """Set5 under its canonical names (baby, bird, ...), as the download stage lays it out."""
    import json
    import shutil

    manifest = json.loads((REPO_ROOT / "data" / "manifest.json").read_text())
    folder = tmp_path_factory.mktemp("raw") / "Set5"
    folder.mkdir()
    for entry in manifest["sets"]["Set5"]["files"]:
        shutil.copyfile(shared_datasets / entry["path"], folder / entry["name"])
    return folder


@pytest.fixture(scope="module")
def set5_x2_arrays(tmp_path_factory: pytest.TempPathFactory, set5_dir: Path):
    """Set5 cut as the prepare stage cuts it, at x2 only, loaded: ``(lr, hr, validation)`` with
    ``lr`` float (N, 1, 41, 41) network inputs, ``hr`` uint8 (N, 1, 41, 41) targets (patches on a
    41-pixel grid, no down-sizing) and ``validation`` ``{2: [(name, lr, hr), ...]}`` whole images, as
    :func:`vdsr.prepare.load_patches` and :func:`vdsr.prepare.load_validation` return them."""
    from vdsr.prepare import (
        load_patches,
        load_validation,
        write_training_set,
        write_validation_set,
    )

    folder = tmp_path_factory.mktemp("prepared_x2")
    images = sorted(set5_dir.iterdir())
    write_training_set(images, folder / "train.h5", scales=[2], downsizing=[1.0], patch_size=41, stride=41)
    write_validation_set(images, folder / "val.h5", scales=[2])
    patches = load_patches(folder / "train.h5")
    return patches.lr, patches.hr, load_validation(folder / "val.h5")


class LocalHTTPServer:
    """A threaded ``http.server`` on 127.0.0.1 serving one folder; records each request's path."""

    def __init__(self, directory: Path) -> None:
        import functools
        import http.server
        import threading

        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_request(self, code: object = "-", size: object = "-") -> None:
                requests.append(self.path)

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

        handler = functools.partial(Handler, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def http_server():
    """Factory: ``http_server(folder)`` starts a loopback server for ``folder``; stopped after the test."""
    servers: list[LocalHTTPServer] = []

    def start(directory: Path) -> LocalHTTPServer:
        servers.append(LocalHTTPServer(directory))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def silent_server_url():
    """Base URL of a socket on 127.0.0.1 that accepts connections but never answers (for timeouts)."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes handshakes; nobody ever reads or replies
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/"


@pytest.fixture
def closed_port_url() -> str:
    """Base URL of a port on 127.0.0.1 that nothing listens on (connections are refused)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


PIPELINE_FILES = ("dvc.yaml", "params.yaml", "Makefile", "stages", "vdsr", "data/manifest.json", "data/.gitignore",
                  "models/.gitignore", ".dvcignore", ".gitignore", "presets")


STACK_DUMP_GRACE_S = 10.0  # after SIGABRT, for every Python process of a timed-out child to print its stacks


def with_faulthandler(env: dict[str, str] | None) -> dict[str, str]:
    """``env`` (default: this process's) with PYTHONFAULTHANDLER=1: every Python process started with
    it, the children's children included, prints the stack of each thread on SIGABRT or a crash."""
    return {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}


def abort_with_stacks(process) -> None:
    """SIGABRT the process group led by ``process`` (its Python processes print their stacks, see
    :func:`with_faulthandler`), then SIGKILL what is left of the group after :data:`STACK_DUMP_GRACE_S`."""
    import contextlib
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STACK_DUMP_GRACE_S)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def run_child(args: list[str], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None,
              **popen: object):
    """Run a command (no shell) in its own process group, capturing text output, like ``subprocess.run``.

    Past ``timeout`` seconds the test fails with the stack of every thread of every Python process
    in the group (faulthandler, on SIGABRT) and the end of the command's output; nothing is left
    running. Extra keywords go to ``subprocess.Popen`` (``preexec_fn``, ...).
    """
    import contextlib
    import resource
    import signal
    import subprocess

    with subprocess.Popen(args, cwd=cwd, env=with_faulthandler(env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
                          **popen) as process:
        with contextlib.suppress(OSError):  # no core files from the SIGABRT of a timeout
            resource.prlimit(process.pid, resource.RLIMIT_CORE, (0, 0))
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            abort_with_stacks(process)
            try:  # a descendant that left the group may hold the pipes open: read what there is
                stdout, stderr = process.communicate(timeout=STACK_DUMP_GRACE_S)
            except subprocess.TimeoutExpired as late:
                stdout, stderr = (late.stdout or "", late.stderr or "")
            raise AssertionError(
                f"{' '.join(map(str, args))} ran over {timeout:g} s and was stopped; stacks (faulthandler) "
                f"and output:\n--- stderr ---\n{_text(stderr)[-12000:]}\n--- stdout ---\n{_text(stdout)[-3000:]}"
            ) from None
        except BaseException:  # Ctrl-C: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def _text(data: str | bytes | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def repo_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of git and dvc children in a temporary repository: ``base`` (default this
    process's), this venv's tools first on PATH, a test identity for the commits, then ``extra``."""
    return {**(os.environ if base is None else base),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@127.0.0.1",
            "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@127.0.0.1", **extra}


def init_repo(repo: Path, env: dict[str, str], message: str) -> None:
    """``git init`` + ``dvc init`` in ``repo`` and commit everything in it as ``message``."""
    for command in (["git", "init", "-q", "-b", "main"], ["dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", message]):
        run_checked(command, repo, env, timeout=120)


def run_checked(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    """Run a command (no shell) with :func:`run_child`; fail the test with its output if it exits non-zero."""
    result = run_child(args, cwd=cwd, env=env, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def merge_params(params: dict, overrides: dict) -> None:
    """Merge ``overrides`` into ``params`` in place: mappings key by key, other values replaced,
    ``None`` deletes the key (``{"train": {"srcnn": None}}`` leaves one model)."""
    for key, value in overrides.items():
        if value is None:
            params.pop(key, None)
        elif isinstance(value, dict) and isinstance(params.get(key), dict):
            merge_params(params[key], value)
        else:
            params[key] = value


def set_params(params_file: Path, overrides: dict[str, dict]) -> None:
    """Update a params.yaml in place with :func:`merge_params`."""
    import yaml

    params = yaml.safe_load(params_file.read_text())
    merge_params(params, overrides)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture
def pipeline_repo(tmp_path: Path, shared_datasets: Path):
    """Factory: a fresh git + DVC repository holding this project's pipeline, with params overrides.

    The mirror points at the local data copy, MLflow at a sqlite store inside the repo.
    Returns (repo path, environment for subprocesses).
    """
    import shutil

    def make(overrides: dict[str, dict]) -> tuple[Path, dict[str, str]]:
        repo = tmp_path / "repo"
        repo.mkdir()
        for name in PIPELINE_FILES:
            source, target = REPO_ROOT / name, repo / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copyfile(source, target)
        set_params(repo / "params.yaml", overrides)
        env = repo_env(VDSR_DATA_MIRROR=str(shared_datasets))
        env.pop("MLFLOW_TRACKING_URI", None)
        init_repo(repo, env, "pipeline")
        return repo, env

    return make


def stage_workdir(root: Path, shared: Path, overrides: dict[str, dict]) -> Path:
    """A folder laid out like the repository after ``download`` (params.yaml with ``overrides``,
    data/manifest.json, data/raw/{Set5,Set14}), for running stage scripts directly."""
    import json
    import shutil

    manifest = json.loads((REPO_ROOT / "data/manifest.json").read_text())
    for set_name in ("Set5", "Set14"):
        (root / "data/raw" / set_name).mkdir(parents=True)
        for entry in manifest["sets"][set_name]["files"]:
            shutil.copyfile(shared / entry["path"], root / "data/raw" / set_name / entry["name"])
    (root / "data/manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(REPO_ROOT / "params.yaml", root / "params.yaml")
    set_params(root / "params.yaml", overrides)
    return root


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with no pixel data at all."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def load_script(path: Path, name: str):
    """A script (``stages/train.py``, ``bench/gpu_check.py``) as a module, with its folder on
    ``sys.path`` as ``python <path>`` has it (``stages/paths.py`` is imported as ``paths``)."""
    import importlib.util
    import sys

    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module

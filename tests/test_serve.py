"""Serving: ``vdsr register`` + a real ``mlflow models serve`` on 127.0.0.1, and ``dvc artifacts get``.

The server runs the released weights (pretrained/vdsr.pt) registered twice in one SQLite store:
version 1 by ``vdsr register`` with every default (the store of the current folder), version 2
through ``MLFLOW_TRACKING_URI`` with ``--max-pixels 3000``; ``models:/vdsr@champion`` must serve
version 2. Its answers are compared with what ``vdsr upscale`` writes for the same files.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, png_header_only, run_checked, run_child
from mlflow_server import clean_env, free_port

RELEASED = REPO_ROOT / "pretrained" / "vdsr.pt"
SERVE_START_TIMEOUT_S = 240.0  # ~35 s on an idle 2-core machine (model download, imports, load)
REQUEST_TIMEOUT_S = 120.0
REGISTER_TIMEOUT_S = 300.0
SECRET = "vdsr-test-secret-7f3a9c"  # in the environment of `vdsr register`: must not reach the store


def cli_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` that imports this checkout's vdsr and finds the venv's ``mlflow``."""
    path = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONPATH": path, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
            "VDSR_TEST_SECRET": SECRET}


def sample_images(folder: Path) -> dict[str, Path]:
    """Small files of each kind the upscaler handles: 8-bit RGB PNG, 16-bit gray PNG, RGBA PNG, JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.1, 0.9, 36)[None, :]
    rgb = np.clip((ramp[..., None] + 0.1 * rng.standard_normal((30, 36, 3))) * 255, 0, 255).astype(np.uint8)
    gray16 = np.clip((ramp + 0.1 * rng.standard_normal((28, 36))) * 65535, 0, 65535).astype(np.uint16)
    alpha = np.linspace(0, 255, 36, dtype=np.uint8)[None, :].repeat(30, axis=0)
    paths = {"rgb": folder / "rgb.png", "gray16": folder / "gray16.png", "rgba": folder / "rgba.png",
             "jpeg": folder / "photo.jpg"}
    Image.fromarray(rgb).save(paths["rgb"])
    Image.fromarray(gray16).save(paths["gray16"])  # mode I;16
    Image.fromarray(np.dstack([rgb, alpha])).save(paths["rgba"])
    Image.fromarray(rgb).save(paths["jpeg"], quality=90)
    return paths


class ModelServer:
    """``mlflow models serve -m <uri> --env-manager local`` on a free 127.0.0.1 port, in its own
    process group, its output in ``log_path``; ready when ``/ping`` answers 200 (bounded)."""

    def __init__(self, model_uri: str, cwd: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = cwd / f"serve-{self.port}.log"
        command = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(self.port)]
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop)
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            self._wait_ready(SERVE_START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited {self.process.returncode}:\n{self.log()[-6000:]}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.5)
        raise TimeoutError(f"mlflow models serve not ready at {self.url} after {timeout_s:g} s:\n{self.log()[-6000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict | str]:
        """POST /invocations; (HTTP status, the JSON answer, or the text when it is not JSON)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/invocations", data=data, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout_s``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # uvicorn's worker too, whatever the parent did
        self.process.wait(timeout=30)
        self._log.close()


def request(rows: list[list]) -> dict:
    return {"dataframe_split": {"columns": ["image", "scale"], "data": rows}}


def b64(path_or_bytes: Path | bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """(server, store folder, register outputs): the released weights registered twice and served
    as ``models:/vdsr@champion`` from ``<store>/mlflow.db``."""
    store = tmp_path_factory.mktemp("store")
    env = cli_env(clean_env())
    first = run_checked([sys.executable, "-m", "vdsr.cli", "register"], store, env, timeout=REGISTER_TIMEOUT_S)
    second = run_checked(
        [sys.executable, "-m", "vdsr.cli", "register", str(RELEASED), "--name", "vdsr", "--max-pixels", "3000"],
        store, {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{(store / 'mlflow.db').as_posix()}"},
        timeout=REGISTER_TIMEOUT_S,
    )
    server = ModelServer("models:/vdsr@champion", store, {**env, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
    try:
        yield server, store, (first, second)
    finally:
        server.stop()


def test_register_versions_and_alias(served) -> None:
    """Two versions; the alias moved to the second and says so; the served model is version 2's (limit 3000)."""
    from mlflow import MlflowClient

    _server, store, (first, second) = served
    assert "version 1" in first.stderr and "alias 'champion' -> version 1" in first.stderr
    assert "alias 'champion' -> version 2 (was version 1)" in second.stderr
    assert "MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow models serve -m 'models:/vdsr@champion'" in first.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{(store / 'mlflow.db').as_posix()}")
    versions = {str(v.version): v for v in client.search_model_versions("name='vdsr'")}
    assert sorted(versions) == ["1", "2"]
    assert str(client.get_model_version_by_alias("vdsr", "champion").version) == "2"
    run = client.get_run(versions["2"].run_id)
    assert run.data.params["serve.max_pixels"] == "3000"
    assert run.data.tags["vdsr.weights.sha256"] == hashlib.sha256(RELEASED.read_bytes()).hexdigest()


def test_served_pictures_equal_vdsr_upscale(served, tmp_path: Path) -> None:
    """One request, four rows (RGB, 16-bit gray, RGBA, JPEG; x2, x3, x4): each answer decodes to
    the pixels, mode and size of the PNG ``vdsr upscale`` writes for that file."""
    from vdsr.cli import main

    server, _store, _ = served
    images = sample_images(tmp_path / "in")
    rows = [("rgb", 2), ("gray16", 3), ("rgba", 2), ("jpeg", 4)]
    status, answer = server.post(request([[b64(images[key]), scale] for key, scale in rows]))
    assert status == 200, answer
    assert list(answer) == ["predictions"] and len(answer["predictions"]) == len(rows)
    for (key, scale), prediction in zip(rows, answer["predictions"]):
        assert list(prediction) == ["image"]
        expected = tmp_path / f"{key}_x{scale}.png"
        assert main(["upscale", str(images[key]), "--scale", str(scale), "-o", str(expected)]) == 0
        served_png = Image.open(io.BytesIO(base64.b64decode(prediction["image"])))
        reference = Image.open(expected)
        assert served_png.format == "PNG" and served_png.mode == reference.mode, key
        assert served_png.size == reference.size == tuple(scale * s for s in Image.open(images[key]).size), key
        assert np.array_equal(np.asarray(served_png), np.asarray(reference)), key


@pytest.mark.parametrize(
    ("case", "row", "message"),
    [
        ("not an image", lambda im: [b64(b"hello, not an image"), 2], "row 0: image: not a readable image"),
        ("not base64", lambda im: ["@@not base64@@", 2], "row 0: image is not valid base64"),
        ("scale 5", lambda im: [b64(im["rgb"]), 5], "row 0: scale must be one of 2, 3, 4, got 5"),
        ("declared too large", lambda im: [b64(png_header_only(100_000, 100_000)), 2], "over the limit of 3,000"),
        ("too large", lambda im: [b64(im["big"]), 2], "declares 64x64 = 4,096 pixels, over the limit of 3,000"),
        ("empty", lambda im: ["", 3], "row 0: image is empty"),
    ],
)
def test_bad_input_is_400_and_server_keeps_serving(served, tmp_path: Path, case: str, row, message: str) -> None:
    server, store, _ = served
    images = sample_images(tmp_path / "in")
    images["big"] = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(images["big"])
    status, answer = server.post(request([row(images)]))
    assert status == 400, (case, answer)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and message in answer["message"], (case, answer)
    for path in (str(tmp_path), str(store), tempfile.gettempdir() + "/vdsr-serve-"):
        assert path not in answer["message"], (case, "a server path in the answer", answer)
    status, answer = server.post(request([[b64(images["rgb"]), 2]]))  # still serving
    assert status == 200 and len(answer["predictions"]) == 1, (case, answer)


def test_bad_row_fails_the_request_and_names_its_row(served, tmp_path: Path) -> None:
    server, _store, _ = served
    images = sample_images(tmp_path / "in")
    status, answer = server.post(request([[b64(images["rgb"]), 2], [b64(images["rgb"]), 1]]))
    assert status == 400 and "row 1: scale must be one of 2, 3, 4, got 1" in answer["message"], answer
    status, answer = server.post({"dataframe_split": {"columns": ["image"], "data": [[b64(images["rgb"])]]}})
    assert status == 400 and "scale" in answer["message"], answer


def test_model_loaded_once_per_server(served, tmp_path: Path) -> None:
    server, _store, _ = served
    images = sample_images(tmp_path / "in")
    for scale in (2, 3):
        assert server.post(request([[b64(images["gray16"]), scale]]))[0] == 200
    assert server.log().count("vdsr serve: model loaded") == 1, server.log()[-4000:]


def test_logged_model_holds_no_machine_path_or_secret(served) -> None:
    """Every file of the registered model (MLmodel, requirements, envs, code) is free of this
    machine's paths and of the registering process's environment; the weights are the release's."""
    import yaml
    from mlflow import MlflowClient

    _server, store, _ = served
    client = MlflowClient(tracking_uri=f"sqlite:///{(store / 'mlflow.db').as_posix()}")
    version = client.get_model_version_by_alias("vdsr", "champion")
    model_dir = store / "mlartifacts" / version.run_id / "artifacts" / "model"
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    names = {p.relative_to(model_dir).as_posix() for p in files}
    assert {"MLmodel", "requirements.txt", "python_env.yaml", "serve_model.py", "code/vdsr/serve.py",
            "artifacts/vdsr.pt"} <= names, names
    assert not any(name.endswith((".pkl", ".pyc")) for name in names), names  # nothing pickled, no bytecode
    code = {name.removeprefix("code/vdsr/") for name in names if name.startswith("code/")}
    assert code == {p.name for p in (REPO_ROOT / "vdsr").glob("*.py")}, code  # the package's sources, nothing else
    assert (model_dir / "artifacts" / "vdsr.pt").read_bytes() == RELEASED.read_bytes()
    home = str(Path.home())
    forbidden = [str(store), str(REPO_ROOT), sys.prefix, tempfile.gettempdir() + "/vdsr-", SECRET]
    forbidden += [home] if home not in ("/", "") else []
    for path in files:
        if path.suffix == ".pt":
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        for needle in forbidden:
            assert needle not in text, f"{path.relative_to(model_dir)} holds {needle!r}"
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"] == "serve_model.py"
    assert flavor["artifacts"]["weights"]["uri"] == f"runs:/{version.run_id}/weights/vdsr.pt"
    run = client.get_run(version.run_id)
    for key, value in [*run.data.tags.items(), *run.data.params.items()]:
        for needle in forbidden:
            assert needle not in value, f"run tag/param {key} = {value!r} holds {needle!r}"


def test_register_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input stops before the store is touched: exit 2, a message naming the file or value."""
    from vdsr.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    not_a_model = tmp_path / "notes.pt"
    not_a_model.write_text("not a model")
    assert main(["register", str(not_a_model)]) == 2
    assert f"{not_a_model}: not a VDSR model file" in capsys.readouterr().err
    assert main(["register", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["register", str(RELEASED), "--name", "bad/name"]) == 2
    assert "--name 'bad/name'" in capsys.readouterr().err
    assert main(["register", str(RELEASED), "--alias", "v2"]) == 2
    assert "--alias 'v2'" in capsys.readouterr().err
    assert main(["register", str(RELEASED), "--max-pixels", "0"]) == 2
    assert "--max-pixels must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def test_register_log_line_shows_no_password_or_machine_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vdsr.cli import _shown_uri

    monkeypatch.chdir(tmp_path)
    assert _shown_uri(f"sqlite:///{tmp_path.as_posix()}/mlflow.db") == "sqlite:///mlflow.db"
    assert _shown_uri("https://alice:s3cret@mlflow.example.org:8443/") == "https://mlflow.example.org:8443/"
    assert _shown_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# --- dvc artifacts get ------------------------------------------------------------------------


def dvc(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_child([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, timeout=180)


def test_dvc_artifacts_get_fetches_the_released_model(tmp_path: Path) -> None:
    """A git repository of this checkout's dvc.yaml, params.yaml and pretrained/vdsr.pt (git-tracked,
    not DVC-tracked): `dvc artifacts get <repo> vdsr` finds the artifact once a version is tagged
    (GTO's `vdsr@v1.0.0`), fetches the exact file, and never overwrites a file without --force."""
    import shutil

    repo = tmp_path / "repo"
    env = {**cli_env(clean_env()), "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@127.0.0.1",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@127.0.0.1"}
    for name in ("dvc.yaml", "params.yaml", "pretrained/vdsr.pt", "pretrained/MODEL_CARD.md"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / name, repo / name)
    run_checked(["git", "init", "-q", "-b", "main"], repo, env)
    run_checked(["dvc", "init", "-q"], repo, env)
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-qm", "release"], repo, env)
    work = tmp_path / "work"
    work.mkdir()

    untagged = dvc(["artifacts", "get", str(repo), "vdsr", "-o", "vdsr.pt"], work, env)
    assert untagged.returncode != 0 and "Unable to find artifact 'vdsr'" in untagged.stderr, untagged.stderr
    assert not (work / "vdsr.pt").exists()
    plain = dvc(["get", str(repo), "pretrained/vdsr.pt", "-o", "plain.pt"], work, env)  # by path: no tag needed
    assert plain.returncode == 0 and (work / "plain.pt").read_bytes() == RELEASED.read_bytes(), plain.stderr

    run_checked(["git", "tag", "-a", "vdsr@v1.0.0", "-m", "Registering artifact vdsr version v1.0.0"], repo, env)
    fetched = dvc(["artifacts", "get", str(repo), "vdsr", "-o", "vdsr.pt"], work, env)
    assert fetched.returncode == 0, fetched.stderr
    assert (work / "vdsr.pt").read_bytes() == RELEASED.read_bytes()
    pinned = dvc(["artifacts", "get", str(repo), "vdsr", "--rev", "v1.0.0", "-o", "pinned.pt"], work, env)
    assert pinned.returncode == 0 and (work / "pinned.pt").read_bytes() == RELEASED.read_bytes(), pinned.stderr

    (work / "mine.pt").write_bytes(b"the user's own file")
    refused = dvc(["artifacts", "get", str(repo), "vdsr", "-o", "mine.pt"], work, env)
    assert refused.returncode != 0 and "already exists" in refused.stderr, refused.stderr
    assert (work / "mine.pt").read_bytes() == b"the user's own file"

"""``vdsr export``: the Keras 3 and ONNX files compute what the PyTorch model computes (Set5 through
the evaluation protocol), carry their provenance, run the snippets of docs/export.md, and refuse bad input.

The models under test have random He-initialised weights (no released weights exist yet): a
depth-5 width-16 VDSR and a width-8 SRCNN, saved with :func:`vdsr.models.save_model`.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported: no TensorFlow here

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image

from vdsr.cli import main
from vdsr.color import rgb2y
from vdsr.evaluate import evaluate_images
from vdsr.images import list_images, read_image
from vdsr.inference import model_upscaler
from vdsr.models import ModelConfig, build_model, load_model, save_model
from vdsr.prepare import write_training_set
from vdsr.resize import imresize

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CONFIGS = {"vdsr": ModelConfig("vdsr", 5, 16), "srcnn": ModelConfig("srcnn", 3, 8)}
SCALES = [2, 3, 4]
# Keras's torch backend converts tensors with np.array(tensor), which numpy 2 flags (keras, not us)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        paths[name] = folder / f"{name}.pt"
        meta = {"git_commit": COMMIT, "git_dirty": False, "mlflow_run_id": f"run-{name}"}
        save_model(paths[name], build_model(config), config, meta)
    return paths


@pytest.fixture(scope="module")
def set5_images(set5_dir: Path) -> list[tuple[str, np.ndarray]]:
    return [(path.stem, read_image(path)) for path in list_images(set5_dir)]


def export(model: Path, fmt: str, out: Path) -> Path:
    assert main(["export", str(model), "--format", fmt, "-o", str(out)]) == 0
    return out


Upscaler = Callable[[np.ndarray, int], np.ndarray]


def recording(upscaler: Upscaler, calls: list) -> Upscaler:
    """``upscaler`` that appends each (input, output) to ``calls``."""

    def run(y: np.ndarray, scale: int) -> np.ndarray:
        out = np.asarray(upscaler(y, scale), dtype=np.float64)
        calls.append((y, out))
        return out

    return run


def compare_on_set5(images: list, reference: Upscaler, exported: Upscaler) -> None:
    """Run both upscalers through the evaluation protocol; outputs to 1e-5, PSNR to 0.01 dB."""
    reference_calls: list = []
    exported_calls: list = []
    expected = evaluate_images(images, SCALES, recording(reference, reference_calls))
    got = evaluate_images(images, SCALES, recording(exported, exported_calls))
    assert len(exported_calls) == len(reference_calls) == len(images) * len(SCALES)
    assert len({y.shape for y, _ in reference_calls}) >= 4  # Set5 at three scales: many image sizes
    for (y, ref), (y_exported, out) in zip(reference_calls, exported_calls):
        assert np.array_equal(y, y_exported) and out.shape == y.shape
        assert np.abs(ref - y).max() > 1e-2  # the network does change its input: the check below can fail
        assert np.abs(out - ref).max() <= 1e-5
    for scale in expected:
        assert got[scale]["psnr"] == pytest.approx(expected[scale]["psnr"], abs=0.01)
        assert got[scale]["ssim"] == pytest.approx(expected[scale]["ssim"], abs=1e-4)
        for name, metrics in expected[scale]["images"].items():
            assert got[scale]["images"][name]["psnr"] == pytest.approx(metrics["psnr"], abs=0.01)


def torch_upscaler(model_file: Path) -> Upscaler:
    model, _config, _meta = load_model(model_file)
    return model_upscaler(model, torch.device("cpu"), tile=0)


# --- Keras 3 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_keras_model_matches_pytorch_on_set5(name: str, model_files: dict, set5_images: list, tmp_path: Path) -> None:
    path = export(model_files[name], "keras", tmp_path / f"{name}.keras")
    model = keras.saving.load_model(path)  # plain Keras: no custom objects, no vdsr code
    assert model.input_shape == (None, None, None, 1)  # channels-last, any size

    def keras_upscaler(y: np.ndarray, scale: int) -> np.ndarray:
        return model.predict(y[None, :, :, None].astype(np.float32), verbose=0)[0, :, :, 0]

    compare_on_set5(set5_images, torch_upscaler(model_files[name]), keras_upscaler)


# --- ONNX ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_onnx_runtime_matches_pytorch_at_any_size(name: str, model_files: dict, set5_images: list,
                                                   tmp_path: Path) -> None:
    path = export(model_files[name], "onnx", tmp_path / f"{name}.onnx")
    proto = onnx.load(path)
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == "" and all(dims[i] for i in (0, 2, 3))  # N, H, W symbolic; one channel
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def onnx_upscaler(y: np.ndarray, scale: int) -> np.ndarray:
        return session.run(None, {"y": y[None, None].astype(np.float32)})[0][0, 0]

    compare_on_set5(set5_images, torch_upscaler(model_files[name]), onnx_upscaler)
    batch = np.random.default_rng(0).random((3, 1, 37, 53), dtype=np.float32)  # a batch, odd sizes
    model, _config, _meta = load_model(model_files[name])
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).numpy()
    assert np.abs(session.run(None, {"y": batch})[0] - expected).max() <= 1e-5


# --- provenance -----------------------------------------------------------------------------------


def recorded(path: Path) -> dict:
    """The provenance read with zipfile / onnx directly, not with vdsr.export."""
    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("metadata.json"))["vdsr"]
    return json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["vdsr"])


@pytest.mark.parametrize("fmt", ["keras", "onnx"])
def test_export_records_source_sha256_config_and_commit(fmt: str, model_files: dict, tmp_path: Path) -> None:
    from vdsr.export import ExportError, read_provenance

    source = model_files["vdsr"]
    path = export(source, fmt, tmp_path / f"model.{fmt}")
    record = recorded(path)
    assert record["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert record["config"] == {"name": "vdsr", "depth": 5, "width": 16}
    assert record["training_commit"] == COMMIT and record["mlflow_run_id"] == "run-vdsr"
    assert record["source_model"] == "vdsr.pt"
    assert read_provenance(path) == record
    (tmp_path / "notes.onnx").write_text("not a model")
    for other in (source, tmp_path / "notes.onnx"):  # a torch zip, a file that is not a protobuf
        with pytest.raises(ExportError, match=f"{other}: no vdsr provenance"):
            read_provenance(other)
    assert [p.name for p in tmp_path.glob(".*.tmp")] == []


# --- the snippets of docs/export.md ---------------------------------------------------------------


def doc_snippets() -> list[str]:
    """The python blocks docs/export.md marks as run by this file, in order."""
    text = (REPO_ROOT / "docs" / "export.md").read_text()
    return re.findall(r"<!-- tested: tests/test_export.py runs this block -->\n```python\n(.*?)```", text, re.DOTALL)


def run_snippet(code: str, cwd: Path) -> str:
    env = {**os.environ, "KERAS_HOME": str(cwd / ".keras"), "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_export_page_has_the_three_snippets() -> None:
    snippets = doc_snippets()
    assert len(snippets) == 3
    assert "model.predict" in snippets[0] and "InferenceSession" in snippets[1] and "model.fit" in snippets[2]


def test_keras_snippet_equals_vdsr_upscale(model_files: dict, set5_dir: Path, tmp_path: Path) -> None:
    butterfly = read_image(set5_dir / "butterfly.png")  # 256 x 256 RGB
    small = np.clip(np.round(imresize(butterfly.astype(np.float64), 1 / 3)), 0, 255).astype(np.uint8)
    Image.fromarray(small).save(tmp_path / "input.png")
    export(model_files["vdsr"], "keras", tmp_path / "vdsr.keras")
    run_snippet(doc_snippets()[0], tmp_path)
    assert main(["upscale", str(tmp_path / "input.png"), "--scale", "3", "--model", str(model_files["vdsr"]),
                 "-o", str(tmp_path / "reference.png"), "--device", "cpu", "--precision", "fp32"]) == 0  # the snippet: fp32
    got = np.asarray(Image.open(tmp_path / "output.png")).astype(int)
    expected = np.asarray(Image.open(tmp_path / "reference.png")).astype(int)
    assert got.shape == expected.shape == (small.shape[0] * 3, small.shape[1] * 3, 3)
    assert np.abs(got - expected).max() <= 1  # float32 rounding can flip a value at .5
    assert (got != expected).mean() < 1e-3
    bicubic = np.asarray(Image.open(tmp_path / "input.png").resize(got.shape[1::-1], Image.BICUBIC)).astype(int)
    assert np.abs(got - bicubic).mean() > 1  # and the network did something


def test_onnx_snippet_equals_vdsr_upscale(model_files: dict, set5_dir: Path, tmp_path: Path) -> None:
    y = rgb2y(read_image(set5_dir / "bird.png"))  # 288 x 288 uint8
    Image.fromarray(np.clip(np.round(imresize(y.astype(np.float64), 1 / 3)), 0, 255).astype(np.uint8)).save(
        tmp_path / "gray.png")
    export(model_files["vdsr"], "onnx", tmp_path / "vdsr.onnx")
    run_snippet(doc_snippets()[1], tmp_path)
    assert main(["upscale", str(tmp_path / "gray.png"), "--scale", "3", "--model", str(model_files["vdsr"]),
                 "-o", str(tmp_path / "reference.png"), "--device", "cpu", "--precision", "fp32"]) == 0  # the snippet: fp32
    got = np.asarray(Image.open(tmp_path / "gray-output.png")).astype(int)
    expected = np.asarray(Image.open(tmp_path / "reference.png")).astype(int)
    assert got.shape == expected.shape == (288, 288)
    assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 1e-3


def test_fit_snippet_lowers_the_loss(model_files: dict, shared_datasets: Path, tmp_path: Path) -> None:
    images = sorted((shared_datasets / "data" / "yang91").glob("t*.bmp"))[:4]
    train_h5 = tmp_path / "data" / "prepared" / "train.h5"
    counts = write_training_set(images, train_h5, scales=SCALES, downsizing=[1.0], patch_size=41, stride=41)
    assert sum(counts.values()) >= 128  # a few batches of 64 per epoch
    export(model_files["vdsr"], "keras", tmp_path / "vdsr.keras")
    stdout = run_snippet(doc_snippets()[2], tmp_path)
    losses = ast.literal_eval(re.search(r"loss per epoch: (\[.*\])", stdout).group(1))
    assert len(losses) == 3 and losses[-1] < losses[0]
    # independently of Keras's running average: the fine-tuned model fits the patches better
    import h5py

    with h5py.File(train_h5, "r") as f:
        x = f["lr"][:].astype(np.float32).transpose(0, 2, 3, 1)
        y = f["hr"][:].astype(np.float32).transpose(0, 2, 3, 1) / 255.0
    before = keras.saving.load_model(tmp_path / "vdsr.keras").predict(x, verbose=0)
    after = keras.saving.load_model(tmp_path / "vdsr-finetuned.keras").predict(x, verbose=0)
    assert np.mean((after - y) ** 2) < np.mean((before - y) ** 2)


# --- errors ---------------------------------------------------------------------------------------


def not_model_files(folder: Path, model_files: dict) -> list[tuple[Path, str]]:
    text = folder / "notes.pt"
    text.write_text("not a model")
    other = folder / "checkpoint.pt"
    torch.save({"state_dict": build_model(CONFIGS["vdsr"]).state_dict()}, other)  # a torch file of another kind
    keras_file = export(model_files["vdsr"], "keras", folder / "exported.keras")  # an export is not a model file
    return [(text, "not a VDSR model file"), (other, "format None, expected 'vdsr-model'"),
            (keras_file, "not a VDSR model file"), (folder / "missing.pt", "model file not found")]


@pytest.mark.parametrize("fmt", ["keras", "onnx"])
def test_not_a_model_file_is_refused_and_nothing_written(fmt: str, model_files: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(b"previous export")
    for source, reason in not_model_files(tmp_path, model_files):
        capsys.readouterr()
        assert main(["export", str(source), "--format", fmt, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"vdsr export: error: {source}" in err and reason in err, err
        assert out.read_bytes() == b"previous export"
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize("fmt, blocked, line", [
    ("keras", "keras", "pip install -e '.[keras]'"),
    ("onnx", "onnxscript", "pip install -e '.[onnx]'"),
    ("onnx", "onnx", "pip install -e '.[onnx]'"),
])
def test_missing_extra_names_the_install_line(fmt: str, blocked: str, line: str, model_files: dict, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # `import <blocked>` now raises ImportError
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(model_files["vdsr"]), "--format", fmt, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"needs {blocked}, which is not installed" in err and line in err, err
    assert not out.exists() and list(tmp_path.glob(".*.tmp")) == []


def test_bad_output_names_are_refused(model_files: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = model_files["vdsr"]
    assert main(["export", str(source), "--format", "keras", "-o", str(tmp_path / "model.h5")]) == 2
    assert "model.h5: a Keras 3 model file must end in .keras" in capsys.readouterr().err
    before = source.read_bytes()
    assert main(["export", str(source), "--format", "onnx", "-o", str(source)]) == 2
    assert "is the source model itself" in capsys.readouterr().err
    assert source.read_bytes() == before
    assert list(tmp_path.iterdir()) == []

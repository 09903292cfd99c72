"""Export a model file (:func:`vdsr.models.save_model`) to Keras 3 (``.keras``) or ONNX.

Both exports compute what :func:`vdsr.models.load_model`'s network computes: the bicubic-upscaled
luma ``Y / 255`` in, the HR luma on the same scale out, unclipped, any height and width.

**Keras 3** (extra ``keras``): a functional model of built-in layers only (``Input``, ``Conv2D``
with ``padding="same"`` and ReLU, ``Add`` for VDSR's global residual), so plain
``keras.saving.load_model`` reads it with any backend. Keras is channels-last: tensors are
``(N, H, W, 1)`` and a PyTorch kernel ``(out, in, kh, kw)`` (OIHW) becomes ``(kh, kw, in, out)``
(HWIO); both libraries compute a cross-correlation, and PyTorch's ``padding = k // 2`` at stride 1
is Keras's ``"same"``. Keras runs on its PyTorch backend (``KERAS_BACKEND=torch``): no TensorFlow.

**ONNX** (extra ``onnx``): ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based
exporter that is PyTorch's default since 2.9 (the TorchScript exporter, ``dynamo=False``, still
works in 2.13 but warns that it is deprecated); it needs ``onnxscript``. Opset
:data:`ONNX_OPSET`; input ``y`` and output ``sr`` are ``(N, 1, H, W)`` float32 with N, H, W
dynamic.

**Provenance.** Each export records :func:`provenance` (source file name and sha256, the
:class:`~vdsr.models.ModelConfig`, training commit and MLflow run) as one JSON object under the
key ``vdsr``: in the ``.keras`` archive's ``metadata.json``, in the ONNX model's
``metadata_props``. :func:`read_provenance` reads it back from either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vdsr.io import atomic_path, sha256_file
from vdsr.models import ModelConfig, load_model

if TYPE_CHECKING:
    import keras
    import torch

log = logging.getLogger(__name__)

FORMATS = ("keras", "onnx")
ONNX_OPSET = 18  # the dynamo exporter's own opset (torch.onnx's onnxscript torchlib) in torch 2.9-2.13
PROVENANCE_KEY = "vdsr"
KERAS_METADATA = "metadata.json"  # the .keras archive's metadata file (keras_version, date_saved)
EXTRAS = {"keras": ("keras",), "onnx": ("onnx", "onnxscript")}  # modules each export imports
INSTALL = {"keras": "pip install -e '.[keras]'", "onnx": "pip install -e '.[onnx]'"}


class ExportError(ValueError):
    """An export this module cannot do (a missing optional extra, a bad output name)."""


def _require(extra: str) -> None:
    """Import the modules of the optional ``extra`` or raise :class:`ExportError` with its install line."""
    import importlib

    if extra == "keras":  # Keras 3 picks its backend at first import; without TensorFlow it must be torch
        os.environ.setdefault("KERAS_BACKEND", "torch")
    for name in EXTRAS[extra]:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ExportError(
                f"--format {extra} needs {name}, which is not installed ({error}): {INSTALL[extra]}"
            ) from None


def provenance(model_path: Path, config: ModelConfig, meta: dict[str, Any]) -> dict[str, Any]:
    """What an export records about its source: file, sha256, config, training commit and run."""
    return {
        "source_model": model_path.name,
        "source_sha256": sha256_file(model_path),
        "config": dataclasses.asdict(config),
        "training_commit": meta.get("git_commit"),
        "training_commit_dirty": meta.get("git_dirty"),
        "mlflow_run_id": meta.get("mlflow_run_id"),
    }


# --- Keras 3 --------------------------------------------------------------------------------------


def layer_plan(config: ModelConfig) -> list[str]:
    """The conv layers' state-dict prefixes in forward order (a ReLU follows all but the last)."""
    if config.name == "vdsr":
        return ["input_layer", *(f"body.{2 * i}" for i in range(config.depth - 2)), "reconstruction"]
    return ["patch_extraction", "nonlinear_mapping", "reconstruction"]


def keras_model(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> keras.Model:
    """The Keras 3 network for ``config`` with ``state_dict``'s weights (channels-last, HWIO).

    VDSR: ``y + conv(relu(conv(... relu(conv(y)))))``; SRCNN: the same chain without the residual.
    """
    _require("keras")
    import keras

    prefixes = layer_plan(config)
    expected = {f"{p}.{kind}" for p in prefixes for kind in ("weight", "bias")}
    if set(state_dict) != expected:
        raise ExportError(f"{config.name}: state dict keys {sorted(state_dict)} do not match {sorted(expected)}")
    y = keras.Input((None, None, 1), name="y")  # (N, H, W, 1), Y / 255
    features = y
    for i, prefix in enumerate(prefixes):
        weight, bias = state_dict[f"{prefix}.weight"], state_dict[f"{prefix}.bias"]  # (O, I, kh, kw), (O,)
        last = i == len(prefixes) - 1
        conv = keras.layers.Conv2D(
            weight.shape[0], weight.shape[2:], padding="same", data_format="channels_last",
            activation=None if last else "relu", name=prefix.replace(".", "_"),
        )
        features = conv(features)
        conv.set_weights([weight.permute(2, 3, 1, 0).numpy(), bias.numpy()])  # OIHW -> HWIO
    sr = keras.layers.Add(name="sr")([y, features]) if config.name == "vdsr" else features
    return keras.Model(y, sr, name=config.name)


def write_keras(model: keras.Model, out_path: Path, record: dict[str, Any]) -> None:
    """Save ``model`` as ``.keras`` with ``record`` under ``vdsr`` in the archive's metadata, atomically.

    Keras saves only to names ending in ``.keras``: it writes into a temporary folder, and the
    archive is copied entry by entry to the temporary file of :func:`vdsr.io.atomic_path`, with
    the provenance added to ``metadata.json``.
    """
    with tempfile.TemporaryDirectory(prefix="vdsr-export-") as folder:
        saved = Path(folder) / "model.keras"
        model.save(saved)
        with atomic_path(out_path) as tmp, zipfile.ZipFile(saved) as source:
            try:
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as target:
                    for item in source.infolist():
                        data = source.read(item)
                        if item.filename == KERAS_METADATA:
                            data = json.dumps({**json.loads(data), PROVENANCE_KEY: record}, indent=2).encode()
                        target.writestr(item, data)
            except OSError as error:
                raise OSError(error.errno, error.strerror, str(out_path)) from None


# --- ONNX ---------------------------------------------------------------------------------------


def onnx_program(model: torch.nn.Module) -> Any:
    """``onnx.ModelProto`` of ``model`` (eval mode, CPU) with dynamic batch, height and width."""
    _require("onnx")
    import torch

    example = torch.zeros(1, 1, 64, 64)  # only its rank matters: every dimension below is dynamic
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with _quiet_exporter():
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["y"], output_names=["sr"],
            dynamic_shapes=(dims,), verbose=False,
        )
    return program.model_proto


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's chatter: graph-optimiser INFO lines, absent-torchvision and internal
    deprecation warnings (none concerns a plain convolutional network)."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def write_onnx(proto: Any, out_path: Path, record: dict[str, Any]) -> None:
    """Check ``proto``, add ``record`` as ``metadata_props["vdsr"]`` (JSON) and save it atomically."""
    import onnx

    onnx.helper.set_model_props(proto, {PROVENANCE_KEY: json.dumps(record, sort_keys=True)})
    proto.doc_string = f"VDSR-project {record['config']['name']} exported from {record['source_model']}"
    onnx.checker.check_model(proto)
    with atomic_path(out_path) as tmp:
        try:
            with open(tmp, "wb") as handle:
                handle.write(proto.SerializeToString())
        except OSError as error:
            raise OSError(error.errno, error.strerror, str(out_path)) from None


# --- the one entry point --------------------------------------------------------------------------


def export_model(model_path: str | Path, fmt: str, out_path: str | Path) -> dict[str, Any]:
    """Export the model file ``model_path`` as ``fmt`` (``keras`` | ``onnx``) to ``out_path``.

    Returns the provenance recorded in the file. Raises :class:`ExportError` for an unknown
    format, a missing extra (naming its ``pip install`` line) or a bad output name, and
    :class:`vdsr.models.ModelFileError` for a file that is not a model file of this project;
    ``out_path`` is then untouched.
    """
    model_path, out_path = Path(model_path), Path(out_path)
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "keras" and out_path.suffix != ".keras":
        raise ExportError(f"-o {out_path}: a Keras 3 model file must end in .keras (keras.saving.load_model needs it)")
    if out_path.resolve() == model_path.resolve():
        raise ExportError(f"-o {out_path}: is the source model itself; choose another output name")
    _require(fmt)
    model, config, meta = load_model(model_path)
    record = provenance(model_path, config, meta)
    if fmt == "keras":
        write_keras(keras_model(config, model.state_dict()), out_path, record)
    else:
        write_onnx(onnx_program(model), out_path, record)
    log.info("wrote %s (%s, %s depth %d width %d, source sha256 %s)", out_path, fmt, config.name, config.depth,
             config.width, record["source_sha256"][:12])
    return record


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance an export recorded: from a ``.keras`` archive or an ONNX file."""
    path = Path(path)
    missing = ExportError(f"{path}: no vdsr provenance (not a .keras or ONNX file written by `vdsr export`)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            metadata = json.loads(archive.read(KERAS_METADATA)) if KERAS_METADATA in names else {}
    else:
        _require("onnx")
        import onnx
        from google.protobuf.message import DecodeError

        try:
            metadata = {p.key: json.loads(p.value) for p in onnx.load(path).metadata_props if p.key == PROVENANCE_KEY}
        except DecodeError:
            raise missing from None
    if PROVENANCE_KEY not in metadata:
        raise missing
    return metadata[PROVENANCE_KEY]

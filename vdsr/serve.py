"""Serving: the released model as an MLflow pyfunc model behind ``mlflow models serve``.

``vdsr register [MODEL] --name vdsr`` logs a model file (:func:`vdsr.models.save_model`; default
the released weights) as an MLflow pyfunc model, registers it as ``NAME`` and points the alias
``champion`` at the new version. ``mlflow models serve -m models:/vdsr@champion --env-manager
local`` then answers ``POST /invocations`` (docs/serving.md)::

    {"dataframe_split": {"columns": ["image", "scale"], "data": [[BASE64_OF_AN_IMAGE_FILE, 2]]}}
    -> {"predictions": [{"image": BASE64_PNG}]}

one prediction per row, each the PNG that ``vdsr upscale --scale <scale>`` writes for that file
(same bits per sample, alpha kept). Bad input (not base64, not an image, a scale other than 2, 3,
4, an image over the size limits) fails the request with HTTP 400 and a message naming the row and
the value: MLflow's scoring server turns an ``MlflowException`` with error code
``INVALID_PARAMETER_VALUE`` raised by ``predict`` into a 400 response with that message (checked
in mlflow 3.17, ``mlflow/pyfunc/scoring_server/__init__.py``: ``invocations`` re-raises it and
``_async_catch_mlflow_exception`` answers ``e.get_http_status_code()``). The server keeps serving.

The file is in two parts. The first knows nothing of MLflow: it turns one request row into one
PNG, and its :func:`file_upscaler` is the only place that calls :mod:`vdsr.upscale`. The second
is the MLflow side (the pyfunc class and the registration), to be moved into
:mod:`vdsr.tracking`, the project's one door to MLflow, where it uses that module's store helpers.

What the logged model holds (``models:/<name>/<version>``): ``MLmodel``, the requirements, the
``serve_model.py`` that builds a :class:`VdsrPyfunc` (MLflow's models from code: nothing is
pickled), ``code/vdsr/`` (this package's source, so the server runs the code the model was
registered with) and ``artifacts/<file>.pt``. No machine path: the weights are first logged to the run (``weights/``)
and the model's artifact is taken from ``runs:/<run id>/weights/<file>``, because MLflow writes an
artifact's source URI into ``MLmodel`` (a local file's would be its absolute path).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc  # the pyfunc base class; this module is imported only to register or to serve
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    import pandas as pd


SCALES = (2, 3, 4)  # as vdsr upscale --scale
# Served limits, fixed at registration (`vdsr register --max-pixels`) in the model's config. The
# pixel limit is checked on the declared size before decoding (vdsr.upscale.read_picture); the
# colour path holds the upscaled image in float64: 4 Mpx at x4 is 1.5 GB of RGB, per request in flight.
SERVE_MAX_PIXELS = 4_000_000
MAX_IMAGE_BYTES = 64 << 20  # an image file in a request, after base64 decoding
SERVE_TILE = 512  # tile side of the network input (vdsr.inference.DEFAULT_TILE); bounds the network's memory
DEFAULT_ALIAS = "champion"
WEIGHTS = "weights"  # the pyfunc artifact's key, and the run's artifact folder for the weights file

# An image file -> its upscaled PNG: (input path, output path, scale, max pixels).
FileUpscaler = Callable[[Path, Path, int, int], None]


class RequestError(ValueError):
    """A request row cannot be served; the message names the row and the value, never a server path."""


# --- one request row -> one PNG (no MLflow) -----------------------------------------------------


def file_upscaler(model_path: Path, device: str = "auto", tile: int = SERVE_TILE, *,
                  backend: str | None = None, precision: str | None = None) -> FileUpscaler:
    """Load the model at ``model_path`` once; return what upscales one image file to a PNG.

    The one coupling to :mod:`vdsr.upscale`: the same steps as ``vdsr upscale`` for each file
    (read_picture, upscale_picture with the network's luma as the variant ``backend`` at
    ``precision`` -- default ``vdsr upscale``'s, :func:`vdsr.backends.resolve_variant` of
    ``auto`` -- write_picture), so the served picture is the one
    the command writes with the same options (band-by-band equals whole-image for one variant).
    Raises :class:`vdsr.images.ImageError` for a file that is not a usable image or declares more
    than ``max_pixels`` pixels, :class:`vdsr.backends.VariantError` for a variant that cannot run.
    """
    from vdsr import backends, inference, upscale

    model, target, meta = inference.load_with_meta(Path(model_path), device)
    trained = inference.trained_scales(meta)  # a single-scale model (srcnn_x2.pt) answers its scale only
    variant = backends.resolve_variant(backend or backends.DEFAULT_BACKEND, precision, target)
    luma = backends.variant_upscaler(model, target, variant, tile=tile)

    def upscale_file(source: Path, output: Path, scale: int, max_pixels: int) -> None:
        try:  # the file's name only: the server's paths stay out of the answer
            inference.check_trained_scale(Path(model_path).name, trained, scale)
        except ValueError as error:
            raise RequestError(str(error)) from None
        picture = upscale.read_picture(source, max_pixels)
        upscale.write_picture(output, upscale.upscale_picture(picture, scale, luma))

    return upscale_file


def decode_image(value: Any, row: int, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The file bytes of the base64 ``image`` field of request row ``row``; :class:`RequestError` if unusable."""
    if not isinstance(value, str):
        raise RequestError(f"row {row}: image must be a base64 string of an image file, got {type(value).__name__}")
    if len(value) > (max_bytes + 2) // 3 * 4 + 4:  # before decoding: base64 is 4 characters per 3 bytes
        size = len(value) * 3 // 4
        raise RequestError(f"row {row}: image of ~{size:,} bytes is over the limit of {max_bytes:,} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"row {row}: image is not valid base64 ({error})") from None
    if not data:
        raise RequestError(f"row {row}: image is empty")
    return data


def check_scale(value: Any, row: int) -> int:
    """The ``scale`` field of row ``row`` as an int in :data:`SCALES`; :class:`RequestError` otherwise."""
    try:
        scale = int(value)
        integral = scale == value and not isinstance(value, bool)
    except (TypeError, ValueError, OverflowError):
        integral = False
    if not integral or scale not in SCALES:
        raise RequestError(f"row {row}: scale must be one of {', '.join(map(str, SCALES))}, got {value!r}")
    return scale


def upscale_png(upscale_file: FileUpscaler, data: bytes, scale: int, row: int, max_pixels: int) -> bytes:
    """The PNG bytes of ``data`` (an image file's bytes) upscaled by ``scale``, through ``upscale_file``.

    The bytes go through a private temporary folder, since the project's image reader takes
    files; an image error's message names the row instead of the temporary file.
    """
    from vdsr.images import ImageError

    with tempfile.TemporaryDirectory(prefix="vdsr-serve-") as folder:
        source, output = Path(folder) / "image", Path(folder) / "upscaled.png"
        source.write_bytes(data)
        try:
            upscale_file(source, output, scale, max_pixels)
        except ImageError as error:
            message = str(error).removeprefix(f"{source}: ").replace(str(source), "the image")
            raise RequestError(f"row {row}: image: {message}") from None
        except RequestError as error:
            raise RequestError(f"row {row}: {error}") from None
        return output.read_bytes()


# --- MLflow: the pyfunc model and its registration (to move into vdsr.tracking) -----------------


class VdsrPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc model: rows of (``image``: base64 image file, ``scale``: 2 | 3 | 4) -> ``image``: base64 PNG.

    Loads the network once per server process (:meth:`load_context`); the model's config
    (``max_pixels``, ``tile``, ``device``, ``backend``, ``precision``) is fixed at registration. Built by ``serve_model.py``.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = {**default_model_config(), **(context.model_config or {})}
        self._max_pixels = int(config["max_pixels"])
        self._upscale_file = file_upscaler(Path(context.artifacts[WEIGHTS]), str(config["device"]), int(config["tile"]),
                                           backend=str(config["backend"]), precision=str(config["precision"]))
        # A line of the server's log (which shows no INFO records of other loggers): once per process.
        print(f"vdsr serve: model loaded (device {config['device']}, tile {config['tile']}, backend "
              f"{config['backend']} {config['precision']}, max {self._max_pixels:,} pixels)", file=sys.stderr, flush=True)

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[dict[str, str]]:
        """One ``{"image": base64 PNG}`` per row; bad input raises an ``INVALID_PARAMETER_VALUE``
        MlflowException, which the scoring server answers with HTTP 400 and its message."""
        missing = [column for column in ("image", "scale") if column not in getattr(model_input, "columns", ())]
        if missing:
            raise MlflowException.invalid_parameter_value(f"missing column(s) {missing}: expected columns image, scale")
        predictions = []
        try:
            for row, (image, scale) in enumerate(zip(model_input["image"], model_input["scale"])):
                data, factor = decode_image(image, row), check_scale(scale, row)
                png = upscale_png(self._upscale_file, data, factor, row, self._max_pixels)
                predictions.append({"image": base64.b64encode(png).decode("ascii")})
        except RequestError as error:
            raise MlflowException.invalid_parameter_value(str(error)) from None
        return predictions


def default_model_config() -> dict[str, Any]:
    """The served model's config: limits, device, and the variant ``vdsr upscale`` defaults to."""
    from vdsr.backends import DEFAULT_BACKEND, DEFAULT_PRECISION

    return {"max_pixels": SERVE_MAX_PIXELS, "tile": SERVE_TILE, "device": "auto",
            "backend": DEFAULT_BACKEND, "precision": DEFAULT_PRECISION}  # auto: resolved where it is served


@dataclass
class Registered:
    """A registered model version: ``models:/<name>@<alias>`` serves it."""

    name: str
    version: str
    alias: str
    run_id: str
    tracking_uri: str
    previous: str | None  # the version the alias pointed at before, if any


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # stays one segment of models:/<name>@<alias>


def _requirements() -> list[str]:
    """Pinned requirements of the served code (explicit: inferring them loads the model in a subprocess)."""
    from importlib.metadata import version

    import numpy
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}",
            f"pillow=={version('pillow')}", f"tqdm=={version('tqdm')}"]


def _signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image"), ColSpec("long", "scale")]),
                          outputs=Schema([ColSpec("string", "image")]))


def _shown_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else its name only: no machine path in the store's tags."""
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return Path(path).name


def _package_source(folder: Path) -> Path:
    """A copy of this package's ``*.py`` files in ``folder/vdsr``: the model's code, without the
    bytecode or any other file a checkout's ``vdsr/`` may hold."""
    source = Path(__file__).resolve().parent
    target = folder / source.name
    target.mkdir()
    for path in sorted(source.glob("*.py")):
        shutil.copyfile(path, target / path.name)
    return target


def _drop_source_path(saved: Path) -> None:
    """Keep only the file name of the model's code file in ``saved``'s ``MLmodel``.

    ``save_model`` records where ``python_model`` was read from (``model_code_path``: the absolute
    path of this checkout's ``vdsr/serve_model.py``); the loader uses only its name, the copy beside
    ``MLmodel`` (mlflow 3.17 ``pyfunc/model.py``, ``_load_context_model_and_signature``).
    """
    from mlflow.models import Model

    model = Model.load(saved / "MLmodel")
    flavor = model.flavors["python_function"]
    flavor["model_code_path"] = Path(flavor["model_code_path"]).name
    model.save(saved / "MLmodel")


def register_model(model_path: Path, name: str, *, alias: str = DEFAULT_ALIAS, repo_root: Path,
                   max_pixels: int = SERVE_MAX_PIXELS) -> Registered:
    """Log ``model_path`` as a pyfunc model in a new run, register it as ``name`` and set ``alias`` on it.

    The store is :func:`vdsr.tracking.default_tracking_uri` of ``repo_root`` (``MLFLOW_TRACKING_URI``,
    else ``sqlite:///<repo_root>/mlflow.db`` with artifacts in ``mlartifacts/``), the experiment
    :func:`vdsr.tracking.experiment_name`. Earlier versions stay; the alias moves to the new one.
    Raises ``ValueError`` for a bad name or limit, :class:`vdsr.models.ModelFileError` for a file
    that is not a model file, ``MlflowException`` when the store refuses.

    The model is written with ``mlflow.pyfunc.save_model`` and uploaded as the run's ``model/``,
    not with ``log_model``: MLflow 3's logged models write their store location into ``MLmodel``
    (``artifact_path: file:///<absolute path>/mlartifacts/models/...`` for a local store).
    """
    import mlflow

    from vdsr import tracking
    from vdsr.io import sha256_file
    from vdsr.models import load_model

    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"--name {name!r}: expected 1-100 letters, digits, '_', '.', '-', "
                         "starting with a letter or digit")
    if not NAME_PATTERN.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"--alias {alias!r}: expected letters, digits, '_', '.', '-', not 'latest' or v<number> "
                         "(MLflow reserves those for versions)")
    if max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {max_pixels}")
    model_path, repo_root = Path(model_path), Path(repo_root)
    _model, config, _meta = load_model(model_path)  # a clear error now, not in the server
    uri = tracking.default_tracking_uri(repo_root)
    default_store = not os.environ.get("MLFLOW_TRACKING_URI")
    artifact_root = tracking.store_root(repo_root) / tracking.ARTIFACTS_DIR if default_store else None
    experiment_id = tracking._open_store(uri, tracking.experiment_name(), artifact_root)
    client = mlflow.MlflowClient(tracking_uri=uri)
    try:
        previous: str | None = client.get_model_version_by_alias(name, alias).version
    except MlflowException:  # no such model or alias yet
        previous = None
    mlflow.set_tracking_uri(uri)
    model_config = {**default_model_config(), "max_pixels": max_pixels}
    tags = {**tracking.reproducibility_tags(repo_root), "vdsr.weights.file": _shown_path(model_path, repo_root),
            "vdsr.weights.sha256": sha256_file(model_path), "vdsr.registered_model": name,
            "mlflow.source.name": "vdsr register"}  # MLflow's default: the absolute path of the script
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"register {name}", tags=tags,
                          nested=mlflow.active_run() is not None) as run:
        mlflow.log_params({"model.name": config.name, "model.depth": config.depth, "model.width": config.width,
                           **{f"serve.{key}": value for key, value in model_config.items()}})
        mlflow.log_artifact(str(model_path), WEIGHTS)
        with tempfile.TemporaryDirectory(prefix="vdsr-register-") as folder:
            package, saved = _package_source(Path(folder)), Path(folder) / tracking.MODEL_NAME
            mlflow.pyfunc.save_model(
                saved,
                python_model=str(package / "serve_model.py"),  # models from code: nothing pickled
                artifacts={WEIGHTS: f"runs:/{run.info.run_id}/{WEIGHTS}/{model_path.name}"},
                code_paths=[str(package)],  # this package, as code/vdsr/
                signature=_signature(),
                model_config=model_config,
                pip_requirements=_requirements(),
            )
            _drop_source_path(saved)
            mlflow.log_artifacts(str(saved), tracking.MODEL_NAME)
    registered = mlflow.register_model(f"runs:/{run.info.run_id}/{tracking.MODEL_NAME}", name)
    client.set_registered_model_alias(name, alias, registered.version)
    return Registered(name, str(registered.version), alias, run.info.run_id, uri, previous)

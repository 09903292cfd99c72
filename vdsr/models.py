"""VDSR (Kim et al., CVPR 2016) and the SRCNN baseline (Dong et al., ECCV 2014 / TPAMI 2016).

Both networks map the bicubic-upscaled luma ``Y / 255`` to the HR luma on the same scale:
input and output are float ``(N, 1, H, W)`` tensors in about [0, 1], same size, NCHW. Neither
clips its output; evaluation does (see :func:`vdsr.evaluate.to_uint8`).

A model file (:func:`save_model`) holds the *unwrapped* module's state dict, the
:class:`ModelConfig` that rebuilds the module and training metadata, all as plain types, so
:func:`load_model` reads it with ``torch.load(weights_only=True)`` and no class is unpickled.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vdsr.io import atomic_path

MODEL_FILE_FORMAT = "vdsr-model"
MODEL_FILE_VERSION = 1
MODELS = ("vdsr", "srcnn")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vdsr"  # "vdsr" | "srcnn"
    depth: int = 20  # conv layers d, input and reconstruction layers included (paper: 20); SRCNN: 3
    width: int = 64  # channels of the hidden layers (paper: 64); SRCNN: n1 = 64, n2 = width // 2

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"model name must be one of {', '.join(MODELS)}, got {self.name!r}")
        if self.name == "vdsr" and self.depth < 3:
            raise ValueError(f"VDSR needs depth >= 3 (input, >= 1 hidden, reconstruction), got {self.depth}")
        if self.name == "srcnn" and self.depth != 3:
            raise ValueError(f"SRCNN has exactly 3 layers (9-5-5), got depth {self.depth}")
        if self.width < 1 or (self.name == "srcnn" and self.width < 2):
            raise ValueError(f"width must be >= 1 (SRCNN: >= 2), got {self.width}")


def he_init(input_layer: nn.Conv2d, *layers: nn.Module) -> None:
    """He et al. 2015 (the paper's init): weights N(0, 2 / n), biases zero.

    n is the fan-in (k^2 x input channels) of every layer but the first, for which it is the
    fan-out (k^2 x output channels). He et al. (Sec. 2.2) show either choice keeps a deep ReLU
    net trainable; the two agree in VDSR's 64 -> 64 body and differ only at the input layer,
    whose fan-in is just 9 single-channel taps: sqrt(2/9) there starts the network with a random
    residual far larger than the image detail it should learn (RMS ~0.6 of the [0, 1] range
    for 20 x 64), while sqrt(2/(9 x 64)) starts it near the bicubic input (RMS ~0.07).
    For VDSR this gives every layer std sqrt(2 / (9 x width)).
    """
    nn.init.kaiming_normal_(input_layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(input_layer.bias)
    for layer in layers:
        for module in layer.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)


# -----------------------------------------------------------------------------------------------
# VDSR: d conv layers of 3x3 with zero padding, ReLU after all but the last, global residual.


class VDSR(nn.Module):
    """Kim et al. 2016, Fig. 2: input layer, d-2 hidden layers, reconstruction layer, + input.

    Every layer is 3x3 with one pixel of zero padding, so feature maps keep the input size
    ("we pad zeros before convolutions", Sec. 3.1) and the receptive field is (2d+1)^2.
    """

    def __init__(self, depth: int = 20, width: int = 64):
        super().__init__()
        # "The first layer operates on the input image" -- 64 filters of 3x3x1.
        self.input_layer = nn.Conv2d(1, width, 3, padding=1)
        # d-2 "layers of the same type": 64 filters of 3x3x64, each followed by a ReLU.
        hidden = []
        for _ in range(depth - 2):
            hidden += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*hidden)
        # "The last layer, used for image reconstruction, consists of a single filter of 3x3x64."
        self.reconstruction = nn.Conv2d(width, 1, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        he_init(self.input_layer, self.body, self.reconstruction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.relu(self.input_layer(x))  # (N, width, H, W)
        residual = self.reconstruction(self.body(features))  # (N, 1, H, W)
        return x + residual  # residual learning: the network predicts HR - ILR


# -----------------------------------------------------------------------------------------------
# SRCNN 9-5-5 (Dong et al. 2016, Sec. 4.3): patch extraction, non-linear mapping, reconstruction.


class SRCNN(nn.Module):
    """SRCNN 9-5-5 with n1 = 64, n2 = 32, mapping the bicubic input directly to HR (no residual).

    Unlike Dong et al., who train without padding and so predict only the central
    (H - 16) x (W - 16) pixels, every layer here zero-pads ('same'): the output has the input's
    size, so SRCNN trains on exactly VDSR's patches and loss and is evaluated with the same
    border crop -- a same-data baseline. Weights use VDSR's He init (:func:`he_init`) rather
    than SRCNN's N(0, 0.001^2), because it is trained with VDSR's recipe.
    """

    def __init__(self, width: int = 64):
        super().__init__()
        self.patch_extraction = nn.Conv2d(1, width, 9, padding=4)
        self.nonlinear_mapping = nn.Conv2d(width, width // 2, 5, padding=2)
        self.reconstruction = nn.Conv2d(width // 2, 1, 5, padding=2)
        self.relu = nn.ReLU(inplace=True)
        he_init(self.patch_extraction, self.nonlinear_mapping, self.reconstruction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.relu(self.patch_extraction(x))  # (N, n1, H, W)
        features = self.relu(self.nonlinear_mapping(features))  # (N, n2, H, W)
        return self.reconstruction(features)  # (N, 1, H, W)


# -----------------------------------------------------------------------------------------------


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised network for ``config`` (uses torch's global RNG: seed it first)."""
    if config.name == "vdsr":
        return VDSR(config.depth, config.width)
    return SRCNN(config.width)


def receptive_field(config: ModelConfig) -> int:
    """Side in pixels of the input region that one output pixel sees (VDSR: 2d + 1; SRCNN: 17)."""
    if config.name == "vdsr":
        return 2 * config.depth + 1
    return 9 + 5 + 5 - 2


def unwrapped_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes."""
    state = {}
    for key, value in model.state_dict().items():
        for prefix in ("_orig_mod.", "module."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value.detach().cpu()
    return state


def _check_plain(value: Any, where: str) -> None:
    """Metadata must be plain (dict/list/str/int/float/bool/None) for ``weights_only`` loading."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r}")
            _check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise TypeError(f"{where}: {type(value).__name__} is not plain (str, int, float, bool, None, list, dict)")


def save_model(path: str | Path, model: nn.Module, config: ModelConfig, meta: dict[str, Any]) -> None:
    """Write weights, the config that rebuilds the model and plain ``meta`` to ``path``, atomically."""
    _check_plain(meta, "meta")
    payload = {
        "format": MODEL_FILE_FORMAT,
        "version": MODEL_FILE_VERSION,
        "config": dataclasses.asdict(config),
        "state_dict": unwrapped_state_dict(model),
        "meta": dict(meta),
    }
    save_atomic(path, payload)


def save_atomic(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, renamed onto it when complete.

    Saving through a file object makes a full disk a plain ``OSError`` naming ``path`` (saving to a
    file name, torch's writer raises an opaque ``RuntimeError`` instead).
    """
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as handle:
                torch.save(payload, handle)
        except OSError as error:
            raise OSError(error.errno, error.strerror, str(path)) from None


class ModelFileError(ValueError):
    """A file is not a model written by :func:`save_model` (or is corrupt)."""


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Rebuild the model saved at ``path``: ``(model in eval mode, config, meta)``.

    Reads with ``torch.load(weights_only=True)``: no code from the file runs. Raises
    :class:`ModelFileError` naming the file if it is not a :func:`save_model` file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all mean "not our file"
        raise ModelFileError(f"{path}: not a VDSR model file ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FILE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path}: not a VDSR model file (format {found!r}, expected {MODEL_FILE_FORMAT!r})")
    if payload.get("version") != MODEL_FILE_VERSION:
        raise ModelFileError(
            f"{path}: model file version {payload.get('version')!r}, this code reads {MODEL_FILE_VERSION}"
        )
    try:
        config = ModelConfig(**payload["config"])
        model = build_model(config)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{path}: model file is inconsistent: {error}") from error
    model.to(map_location).eval()
    return model, config, payload.get("meta", {})


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda if available, else cpu; ``cuda`` pinned to the current index; clear errors."""
    if str(name) == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(name)!r} requested but CUDA is not available (use cpu or auto)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MODELS",
    "ModelConfig",
    "ModelFileError",
    "SRCNN",
    "VDSR",
    "build_model",
    "count_parameters",
    "load_model",
    "receptive_field",
    "save_model",
    "unwrapped_state_dict",
]

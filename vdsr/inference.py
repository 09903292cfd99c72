"""The network pass, one for every caller: training's validation, ``vdsr evaluate``, the pipeline's
evaluation and report, ``vdsr upscale`` and serving. Model loading, tiles, precision and the x8
self-ensemble live here; image files, colour and the command line stay in :mod:`vdsr.upscale`, so
changing them changes no training or evaluation stage's dependencies (dvc.yaml).

Tiles. The network sees the image in tiles with an overlap of at least its receptive-field radius,
and only each tile's interior is kept. Every output pixel then sees exactly the input it sees in
one whole-image pass -- at the image border both use the model's zero padding -- so the result
equals whole-image inference, with memory bounded by the tile size.

Precision. ``fp32`` computes in exact fp32 (:func:`vdsr.runtime.exact_fp32`: no autocast, no TF32),
as evaluation must; ``bf16`` runs under bfloat16 autocast (8 significant bits).

Variants. ``vdsr upscale`` and serving may run the network another way (:mod:`vdsr.backends`:
channels_last weights, ONNX Runtime or OpenVINO on the ONNX export, bf16); they run a copy, so
evaluation's model, and its exact fp32 NCHW pass (:func:`model_upscaler`, :func:`load_upscaler`),
are never changed by them, and that module (with the exporter it imports) is no dependency of the
training and evaluation stages.

Self-ensemble (Timofte, Rothe & Van Gool 2016, "Seven ways to improve example-based single image
super resolution"; the "+" models of EDSR, Lim et al. 2017): the network runs on the 8 images of
the input under the symmetries of the square (identity, 3 rotations, their 4 mirror images), each
output is mapped back by the inverse symmetry, and the 8 are averaged. VDSR's input is the bicubic
upscale, and MATLAB's bicubic ``imresize`` commutes with flips and transposes (its kernel and
sampling grid are symmetric), so transforming the bicubic luma is transforming the LR image.
Each pass is the plain one (exact fp32 in evaluation), the mean is taken in float64; the cost is
8 passes. The numbers it gives are reported as their own row, "VDSR+ (x8 self-ensemble)", never
mixed with the plain model's.

Scales. A model file whose meta records the scales it was trained for (a release's
``provenance.prepare.scales``, e.g. ``[2]`` for ``pretrained/srcnn_x2.pt``) is refused at any other
scale by :func:`load_upscaler` (``vdsr evaluate``) and :func:`load_network` given the scale
(``vdsr upscale``), with a ``ValueError`` naming the file; files without that record (stage-trained
``models/*.pt``) are taken as multi-scale.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vdsr.evaluate import Upscaler

if TYPE_CHECKING:  # torch is imported only when a model is used (``vdsr evaluate --model bicubic``)
    import torch

log = logging.getLogger(__name__)

DEFAULT_TILE = 512  # tile side in pixels of the network input; 0: the whole image at once


# --- the network, in tiles ----------------------------------------------------------------------


def receptive_radius(model: torch.nn.Module) -> int:
    """Pixels each side that one output pixel depends on: the sum of the conv layers' half-widths.

    Exact for a chain of convolutions (VDSR: depth, SRCNN 9-5-5: 8); an upper bound otherwise.
    """
    import torch

    radius = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            radius += max(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation))
    return radius


def checked_overlap(model: torch.nn.Module, tile: int, overlap: int | None, precision: str) -> int:
    """The overlap to use (default: the receptive-field radius); ValueError for values that would
    make tiled differ from whole-image inference, a negative tile or an unknown precision."""
    radius = receptive_radius(model)
    overlap = radius if overlap is None else overlap
    if overlap < radius:
        raise ValueError(
            f"overlap {overlap} is below the model's receptive-field radius {radius}: "
            "tile seams would differ from whole-image inference"
        )
    if tile < 0:
        raise ValueError(f"tile must be >= 0 (0: no tiling), got {tile}")
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return overlap


@dataclass(frozen=True)
class Tile:
    """A tile of :func:`tile_grid`: the output box ``top:bottom, left:right`` and the window
    ``t0:b0, l0:r0`` the network sees (the box plus the overlap, clipped at the image border)."""

    top: int
    left: int
    bottom: int
    right: int
    t0: int
    l0: int
    b0: int
    r0: int


def tile_grid(height: int, width: int, tile: int, overlap: int) -> list[list[Tile]]:
    """Rows of tiles of side ``tile`` (0: one tile) over a (height, width) image, top to bottom,
    left to right, each with ``overlap`` pixels of context."""
    tile = tile or max(height, width)
    rows = []
    for top in range(0, height, tile):
        row = []
        for left in range(0, width, tile):
            bottom, right = min(top + tile, height), min(left + tile, width)
            t0, l0 = max(top - overlap, 0), max(left - overlap, 0)
            b0, r0 = min(bottom + overlap, height), min(right + overlap, width)
            row.append(Tile(top, left, bottom, right, t0, l0, b0, r0))
        rows.append(row)
    return rows


def run_tile(
    model: torch.nn.Module, y32: np.ndarray, tile: Tile, device: torch.device, row0: int = 0, *,
    self_ensemble: bool = False,
) -> np.ndarray:
    """The network's float32 estimate inside ``tile``'s box, from its window of the float32 luma
    ``y32``, which holds the image's rows from ``row0`` on, at full width. ``self_ensemble``: the
    mean of the 8 symmetries' passes over the window (:func:`self_ensemble`; a symmetry of a window
    is the window of the symmetric image, so tiled still equals whole-image). Call under
    :func:`network_numerics`."""
    window = y32[tile.t0 - row0 : tile.b0 - row0, tile.l0 : tile.r0]
    inner = (slice(tile.top - tile.t0, tile.bottom - tile.t0), slice(tile.left - tile.l0, tile.right - tile.l0))
    if not self_ensemble:
        return _forward(model, window, device)[inner]
    return mean_over_symmetries(lambda w: _forward(model, w, device), window)[inner].astype(np.float32)


def _forward(model: torch.nn.Module, window: np.ndarray, device: torch.device) -> np.ndarray:
    """One pass of the network over an (h, w) float32 window, back as float32 numpy."""
    import torch

    return model(torch.from_numpy(window).to(device)[None, None])[0, 0].float().cpu().numpy()


@contextlib.contextmanager
def network_numerics(device: torch.device, precision: str) -> Iterator[None]:
    """Inference mode plus ``precision``: ``fp32`` exact (:func:`vdsr.runtime.exact_fp32`) or ``bf16`` autocast."""
    import torch

    from vdsr.runtime import exact_fp32

    numerics = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else exact_fp32(device)
    with torch.inference_mode(), numerics:
        yield


def predict_y(
    model: torch.nn.Module,
    y: np.ndarray,
    device: str | torch.device = "cpu",
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    *,
    precision: str = "fp32",
    self_ensemble: bool = False,
) -> np.ndarray:
    """The network's HR luma for the bicubic-upscaled luma ``y`` (H, W), float on [0, 1] -> float64 (H, W).

    ``tile``: side of the tiles the image is cut into (0: whole image). ``overlap``: input pixels
    added around each tile (default: the model's receptive-field radius, the smallest value for
    which tiled equals whole-image inference). ``precision``: ``fp32`` (default) computes in exact
    fp32 (:func:`vdsr.runtime.exact_fp32`: no autocast, no TF32), as evaluation must; ``bf16``
    runs under bfloat16 autocast, faster on GPUs and CPUs with native bf16 but with 8 significant
    bits (about 1/256 of the signal: visible in 16-bit output). ``self_ensemble``: each tile is the
    mean of the 8 symmetries' passes (8x the time). The output is not clipped.
    """
    import torch

    if y.ndim != 2:
        raise ValueError(f"predict_y expects a (H, W) luma array, got shape {y.shape}")
    overlap = checked_overlap(model, tile, overlap, precision)
    device = torch.device(device)
    height, width = y.shape
    y32 = np.ascontiguousarray(y, dtype=np.float32)
    out = np.empty((height, width), dtype=np.float32)
    with network_numerics(device, precision):
        for row in tile_grid(height, width, tile, overlap):
            for box in row:
                out[box.top : box.bottom, box.left : box.right] = run_tile(model, y32, box, device,
                                                                           self_ensemble=self_ensemble)
    return out.astype(np.float64)


def predict_window(
    model: torch.nn.Module, y: np.ndarray, box: tuple[int, int, int, int], device: str | torch.device = "cpu"
) -> np.ndarray:
    """:func:`predict_y` of ``y`` (H, W) inside ``box`` = (top, left, bottom, right) only, float64.

    The network sees the box plus its receptive-field radius (clipped at the image border), as a
    tile of :func:`predict_y` does, so the values equal those of whole-image inference.
    """
    top, left, bottom, right = box
    if not (0 <= top < bottom <= y.shape[0] and 0 <= left < right <= y.shape[1]):
        raise ValueError(f"box {box} is not inside the {y.shape} image")
    radius = receptive_radius(model)
    t0, l0 = max(top - radius, 0), max(left - radius, 0)
    window = y[t0 : min(bottom + radius, y.shape[0]), l0 : min(right + radius, y.shape[1])]
    return predict_y(model, window, device, tile=0)[top - t0 : bottom - t0, left - l0 : right - l0]


def load_network(path: Path, device: str, *, scale: int | None = None) -> tuple[torch.nn.Module, torch.device]:
    """The model saved at ``path`` (:func:`vdsr.models.save_model`), in eval mode on ``device``.

    ``scale``: the scale it will run at; a model trained for other scales only is refused
    (:func:`check_trained_scale`)."""
    model, target, meta = load_with_meta(Path(path), device)
    if scale is not None:
        check_trained_scale(path, trained_scales(meta), scale)
    return model, target


def load_with_meta(path: Path, device: str) -> tuple[torch.nn.Module, torch.device, dict]:
    """:func:`load_network` with the file's meta (:func:`trained_scales` reads it)."""
    from vdsr.models import load_model, resolve_device

    target = resolve_device(device)
    model, config, meta = load_model(path, map_location=target)
    log.info("model %s: %s depth %d width %d on %s", path, config.name, config.depth, config.width, target)
    return model, target, meta


def trained_scales(meta: dict) -> tuple[int, ...] | None:
    """The scales a model file was trained for: its meta's ``provenance.prepare.scales`` (what a
    release records, :mod:`vdsr.release`), or None when the file does not say (a stage-trained
    ``models/*.pt``: no check)."""
    provenance = meta.get("provenance") if isinstance(meta, dict) else None
    prepare = provenance.get("prepare") if isinstance(provenance, dict) else None
    scales = prepare.get("scales") if isinstance(prepare, dict) else None
    if not isinstance(scales, (list, tuple)) or not scales:
        return None
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in scales):
        return None
    return tuple(scales)


def check_trained_scale(path: Path | str, trained: tuple[int, ...] | None, scale: int) -> None:
    """``ValueError`` naming the file, the scales it was trained for and ``scale`` when ``trained``
    (:func:`trained_scales`) does not hold ``scale``: a single-scale model (``srcnn_x2.pt``) at
    another scale gives a wrong picture without any other sign."""
    if trained is None or scale in trained:
        return
    path = Path(path)
    found = re.fullmatch(r"(.*_x)\d+", path.stem)
    other = f" ({path.with_name(f'{found.group(1)}{scale}{path.suffix}')})" if found else ""
    only = ", ".join(f"x{s}" for s in trained)
    raise ValueError(f"{path} was trained for {only} only, not x{scale}: use a model trained for x{scale}{other} "
                     "or one for all scales")


def load_upscaler(path: Path, device: str, *, tile: int = DEFAULT_TILE, scales: Sequence[int] = ()) -> Upscaler:
    """An :data:`vdsr.evaluate.Upscaler` running the model at ``path`` (for ``vdsr evaluate``).

    Runs in exact fp32 (no autocast, no TF32), so metrics do not depend on the device's rounding.
    A model whose file records the scales it was trained for (``provenance.prepare.scales``: a
    release, e.g. the single-scale ``srcnn_x2.pt``) is refused at any other scale with a
    ``ValueError`` naming the file (:func:`check_trained_scale`): at load time for each of
    ``scales``, the scales the caller will ask for, and at every call; other models are
    multi-scale, the scale argument is not used.
    """
    model, target, meta = load_with_meta(Path(path), device)
    trained = trained_scales(meta)
    for scale in scales:
        check_trained_scale(path, trained, scale)
    run = model_upscaler(model, target, tile=tile)
    if trained is None:
        return run

    def upscaler(bicubic_y: np.ndarray, scale: int) -> np.ndarray:
        check_trained_scale(path, trained, scale)
        return run(bicubic_y, scale)

    return upscaler


def model_upscaler(model: torch.nn.Module, device: torch.device, *, tile: int = DEFAULT_TILE) -> Upscaler:
    """An :data:`vdsr.evaluate.Upscaler` running ``model`` (already on ``device``) in exact fp32."""

    def upscaler(bicubic_y: np.ndarray, scale: int) -> np.ndarray:
        return predict_y(model, bicubic_y, device, tile, precision="fp32")

    return upscaler


@dataclass
class Network:
    """A loaded model as ``vdsr upscale`` runs it: on ``device``, in tiles of side ``tile`` (0: one)
    with ``overlap`` pixels of context (at least the receptive-field radius), at ``precision``,
    plain or as the x8 self-ensemble; ``model`` is :func:`vdsr.backends.upscale_model` of the variant ``backend``
    (the default ``torch-nchw``: the model itself)."""

    model: torch.nn.Module
    device: torch.device
    tile: int
    overlap: int
    precision: str
    self_ensemble: bool = False
    backend: str = "torch-nchw"  # the vdsr.backends.Variant that ``model`` runs

    def channels(self) -> int:
        """The widest layer's output channels: what the activations of a window scale with."""
        return max((getattr(m, "out_channels", 1) for m in self.model.modules()), default=1)


# --- x8 self-ensemble ---------------------------------------------------------------------------

SYMMETRIES = 8  # the dihedral group of the square


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """Symmetry ``k`` in [0, 8) of an (H, W) array, numbered as the training augmentation
    (:func:`vdsr.train.augment`): bit 0 transposes, then bit 1 flips left-right, then bit 2 flips
    upside-down. A view, not a copy."""
    if not 0 <= k < SYMMETRIES:
        raise ValueError(f"symmetry index must be in [0, {SYMMETRIES}), got {k}")
    if k & 1:
        image = image.T
    if k & 2:
        image = image[:, ::-1]
    if k & 4:
        image = image[::-1, :]
    return image


def undo_dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """The inverse of :func:`dihedral` ``k``: its three steps undone in reverse order."""
    if not 0 <= k < SYMMETRIES:
        raise ValueError(f"symmetry index must be in [0, {SYMMETRIES}), got {k}")
    if k & 4:
        image = image[::-1, :]
    if k & 2:
        image = image[:, ::-1]
    if k & 1:
        image = image.T
    return image


def mean_over_symmetries(network: Callable[[np.ndarray], np.ndarray], image: np.ndarray) -> np.ndarray:
    """The mean, in float64, of ``network`` over the 8 symmetries of ``image`` (H, W), each output
    mapped back by the inverse symmetry: the one loop of the self-ensemble."""
    total = np.zeros(image.shape, dtype=np.float64)
    for k in range(SYMMETRIES):
        estimate = network(np.ascontiguousarray(dihedral(image, k)))
        total += undo_dihedral(np.asarray(estimate, dtype=np.float64), k)
    return total / SYMMETRIES


def self_ensemble(luma: Upscaler) -> Upscaler:
    """An :data:`vdsr.evaluate.Upscaler` that averages ``luma`` over the 8 symmetries (8x its cost)."""

    def ensembled(bicubic_y: np.ndarray, scale: int) -> np.ndarray:
        return mean_over_symmetries(lambda y: luma(y, scale), bicubic_y)

    return ensembled

"""``vdsr upscale``: super-resolve your own images with a trained model (library code, no DVC).

Colour is handled as in SRCNN's and VDSR's demos: the image goes to YCbCr (MATLAB BT.601,
:mod:`vdsr.color`), all channels are upscaled with MATLAB's bicubic ``imresize``, and the luma
``Y`` is then replaced by the network's estimate; Cb and Cr stay bicubic. Grayscale images are
their own ``Y``. Alpha is resized bicubic, like Cb/Cr. Everything runs in float64 on the [0, 1]
scale: 16-bit PNGs keep their full precision and are written back as 16-bit PNGs, 8-bit images
as 8-bit PNGs.

The network sees the image in tiles with an overlap of at least its receptive-field radius, and
only each tile's interior is kept. Every output pixel then sees exactly the input it sees in
one whole-image pass -- at the image border both use the model's zero padding -- so the result
equals whole-image inference, with memory bounded by the tile size.

Pillow reads 16-bit RGB(A) PNGs as 8-bit. We decode such files twice with Pillow's own PNG
decoder, unpacking the high and then the low byte of every sample, and write 16-bit colour PNGs
with a small encoder (:func:`write_png16`), since Pillow has no 16-bit colour modes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from vdsr.color import rgb2ycbcr, ycbcr2rgb
from vdsr.evaluate import Upscaler
from vdsr.images import ImageError
from vdsr.io import atomic_path
from vdsr.resize import imresize

if TYPE_CHECKING:  # torch is imported only when a model is used (``vdsr evaluate --model bicubic``)
    import torch

log = logging.getLogger(__name__)

# Released weights will live here; until then ``--model`` is required.
PRETRAINED_MODEL = Path(__file__).resolve().parents[1] / "pretrained" / "vdsr.pt"
DEFAULT_TILE = 512  # tile side in pixels of the network input; 0: the whole image at once
# Largest input accepted, in pixels, checked on the declared size before decoding (decompression
# bombs). The colour path holds the whole upscaled image in float64: 16 Mpx at x4 is ~6 GB.
DEFAULT_MAX_PIXELS = 16_000_000
SCALES = (2, 3, 4)


# --- devices and the network --------------------------------------------------------------------


def model_or_released(model: Path | None) -> Path:
    """``model``, or when it is None the released weights (:data:`PRETRAINED_MODEL`, logged by name)."""
    if model is not None:
        return model
    if not PRETRAINED_MODEL.is_file():
        raise FileNotFoundError(
            f"no released weights ({PRETRAINED_MODEL} does not exist): pass --model PATH, "
            "e.g. models/vdsr.pt after `dvc repro`"
        )
    log.info("model: the released weights %s (card: %s)", PRETRAINED_MODEL, PRETRAINED_MODEL.with_name("MODEL_CARD.md"))
    return PRETRAINED_MODEL


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


def predict_y(
    model: torch.nn.Module,
    y: np.ndarray,
    device: str | torch.device = "cpu",
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    *,
    precision: str = "fp32",
) -> np.ndarray:
    """The network's HR luma for the bicubic-upscaled luma ``y`` (H, W), float on [0, 1] -> float64 (H, W).

    ``tile``: side of the tiles the image is cut into (0: whole image). ``overlap``: input pixels
    added around each tile (default: the model's receptive-field radius, the smallest value for
    which tiled equals whole-image inference). ``precision``: ``fp32`` (default) computes in exact
    fp32 (:func:`vdsr.runtime.exact_fp32`: no autocast, no TF32), as evaluation must; ``bf16``
    runs under bfloat16 autocast, faster on GPUs and CPUs with native bf16 but with 8 significant
    bits (about 1/256 of the signal: visible in 16-bit output). The output is not clipped.
    """
    import torch

    from vdsr.runtime import exact_fp32

    if y.ndim != 2:
        raise ValueError(f"predict_y expects a (H, W) luma array, got shape {y.shape}")
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
    device = torch.device(device)
    height, width = y.shape
    tile = tile or max(height, width)
    y32 = np.ascontiguousarray(y, dtype=np.float32)
    out = np.empty((height, width), dtype=np.float32)
    if precision == "bf16":
        numerics = torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        numerics = exact_fp32(device)
    with torch.inference_mode(), numerics:
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                bottom, right = min(top + tile, height), min(left + tile, width)
                t0, l0 = max(top - overlap, 0), max(left - overlap, 0)  # the tile plus its margin
                b0, r0 = min(bottom + overlap, height), min(right + overlap, width)
                window = torch.from_numpy(y32[t0:b0, l0:r0]).to(device)[None, None]  # (1, 1, h, w)
                estimate = model(window)[0, 0, top - t0 : bottom - t0, left - l0 : right - l0]
                out[top:bottom, left:right] = estimate.float().cpu().numpy()
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


def load_network(path: Path, device: str) -> tuple[torch.nn.Module, torch.device]:
    """The model saved at ``path`` (:func:`vdsr.models.save_model`), in eval mode on ``device``."""
    from vdsr.models import load_model, resolve_device

    target = resolve_device(device)
    model, config, _meta = load_model(path, map_location=target)
    log.info("model %s: %s depth %d width %d on %s", path, config.name, config.depth, config.width, target)
    return model, target


def load_upscaler(path: Path, device: str, *, tile: int = DEFAULT_TILE) -> Upscaler:
    """An :data:`vdsr.evaluate.Upscaler` running the model at ``path`` (for ``vdsr evaluate``).

    Runs in exact fp32 (no autocast, no TF32), so metrics do not depend on the device's rounding.
    The models are multi-scale: the scale argument is not used.
    """
    model, target = load_network(Path(path), device)
    return model_upscaler(model, target, tile=tile)


def model_upscaler(model: torch.nn.Module, device: torch.device, *, tile: int = DEFAULT_TILE) -> Upscaler:
    """An :data:`vdsr.evaluate.Upscaler` running ``model`` (already on ``device``) in exact fp32."""

    def upscaler(bicubic_y: np.ndarray, scale: int) -> np.ndarray:
        return predict_y(model, bicubic_y, device, tile, precision="fp32")

    return upscaler


# --- colour -------------------------------------------------------------------------------------


def upscale_pixels(pixels: np.ndarray, scale: int, luma: Upscaler) -> np.ndarray:
    """Upscale (H, W) gray or (H, W, 3) RGB float on [0, 1] by ``scale``: ``luma`` for Y, bicubic for CbCr.

    Returns float64 (sH, sW[, 3]) on [0, 1], clipped.
    """
    if pixels.ndim == 2:
        return np.clip(luma(imresize(pixels, float(scale)), scale), 0.0, 1.0)
    ycbcr = imresize(rgb2ycbcr(pixels), float(scale))  # (sH, sW, 3); Cb, Cr stay bicubic
    ycbcr[..., 0] = luma(ycbcr[..., 0], scale)
    return np.clip(ycbcr2rgb(ycbcr), 0.0, 1.0)


# --- image files --------------------------------------------------------------------------------


@dataclass
class Picture:
    """An image on the [0, 1] scale: ``pixels`` (H, W) gray or (H, W, 3) RGB float64, optional
    ``alpha`` (H, W) float64, and ``bits`` per sample (8 or 16) of the file."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    bits: int


def _png_16bit_samples(image: Image.Image, path: Path) -> np.ndarray | None:
    """uint16 (H, W, C) samples of a 16-bit colour or gray+alpha PNG, which Pillow reads as 8 bits.

    ``image``: opened, not yet loaded (loading clears ``image.tile``). None for other files.
    """
    if image.format != "PNG" or len(image.tile) != 1:
        return None
    tile = image.tile[0]
    rawmode = tile.args if isinstance(tile.args, str) else tile.args[0]
    if rawmode in ("RGB;16B", "RGBA;16B"):  # decode twice: high bytes, then low bytes
        image.load()
        high = np.asarray(image, dtype=np.uint16)
        with Image.open(path) as again:
            again.tile = [tile._replace(args=rawmode.replace(";16B", ";16L"))]
            again.load()
            low = np.asarray(again, dtype=np.uint16)
        return high << 8 | low
    if rawmode == "LA;16B":  # 4 bytes a pixel: decode them as raw RGBA bytes (L hi, L lo, A hi, A lo)
        with Image.open(path) as again:
            again.tile = [tile._replace(args="RGBA")]
            again.load()
            raw = np.asarray(again, dtype=np.uint16)
        return np.stack([raw[..., 0] << 8 | raw[..., 1], raw[..., 2] << 8 | raw[..., 3]], axis=-1)
    return None


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only), refusing a declared size over ``max_pixels`` before any decoding."""
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our limit replaces Pillow's
    try:
        image = Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageError(
            f"{path}: declares {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(--max-pixels); refused before decoding"
        )
    return image


def read_picture(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Read an image file for upscaling; :class:`vdsr.images.ImageError` naming the file if it cannot.

    Images declaring more than ``max_pixels`` pixels are refused from their header, before decoding.
    """
    path = Path(path)
    try:
        with _open_checked(path, max_pixels) as image:
            samples16 = _png_16bit_samples(image, path)
            image.load()
            mode = image.mode
            if samples16 is not None:
                data, bits = samples16.astype(np.float64) / 65535.0, 16
                if data.shape[2] == 2:  # gray + alpha
                    return Picture(data[..., 0], data[..., 1], bits)
                alpha = data[..., 3] if data.shape[2] == 4 else None
                return Picture(data[..., :3], alpha, bits)
            if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                gray = np.asarray(image, dtype=np.float64)
                if gray.min() < 0 or gray.max() > 65535:
                    raise ImageError(f"{path}: 32-bit integer samples outside 0..65535 are not supported")
                return Picture(gray / 65535.0, None, 16)
            if mode == "F":
                raise ImageError(f"{path}: floating-point images (mode F) are not supported")
            if mode == "P":
                mode = "RGBA" if "transparency" in image.info else "RGB"
            elif mode in ("1", "L", "LA", "RGB", "RGBA"):
                pass
            elif mode in ("La", "PA"):
                mode = "LA" if mode == "La" else "RGBA"
            else:  # CMYK, YCbCr, LAB, HSV, RGBX, RGBa, ...
                mode = "RGBA" if "A" in mode or "a" in mode else "RGB"
            data = np.asarray(image.convert("L" if mode == "1" else mode), dtype=np.float64) / 255.0
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: too large ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ImageError):
            raise
        raise ImageError(f"{path}: not a readable image ({error})") from None
    if data.ndim == 2:
        return Picture(data, None, 8)
    if data.shape[2] == 2:
        return Picture(data[..., 0], data[..., 1], 8)
    return Picture(data[..., :3], data[..., 3] if data.shape[2] == 4 else None, 8)


def write_png16(path: Path, samples: np.ndarray) -> None:
    """Write uint16 (H, W) gray, (H, W, 2) gray+alpha, (H, W, 3) RGB or (H, W, 4) RGBA as a 16-bit PNG."""
    if samples.dtype != np.uint16:
        raise TypeError(f"write_png16 expects uint16 samples, got {samples.dtype}")
    samples = samples[..., None] if samples.ndim == 2 else samples
    height, width, channels = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]  # PNG spec, IHDR colour types
    rows = samples.astype(">u2").reshape(height, width * channels).view(np.uint8)  # big-endian bytes
    scanlines = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def write_picture(path: Path, picture: Picture, *, overwrite: bool = False) -> None:
    """Write ``picture`` as a PNG with its bit depth (8 or 16) and alpha, atomically (temporary name,
    then rename). FileExistsError if ``path`` exists and not ``overwrite``."""
    planes = [picture.pixels] if picture.pixels.ndim == 2 else [picture.pixels[..., c] for c in range(3)]
    if picture.alpha is not None:
        planes.append(picture.alpha)
    data = np.stack(planes, axis=-1) if len(planes) > 1 else planes[0]
    top = 65535.0 if picture.bits == 16 else 255.0
    quantised = np.clip(np.round(data * top), 0, top)
    with atomic_path(path) as tmp:
        try:
            if picture.bits == 16:
                write_png16(tmp, quantised.astype(np.uint16))
            else:
                Image.fromarray(quantised.astype(np.uint8)).save(tmp, format="PNG")
        except OSError as error:  # disk full, file size limit: the error names no file by itself
            raise OSError(error.errno, error.strerror, str(path)) from None
        if not overwrite and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists (--overwrite replaces it)", str(path))


def upscale_picture(picture: Picture, scale: int, luma: Upscaler) -> Picture:
    """Upscale colour (Y by ``luma``, CbCr bicubic) and alpha (bicubic, clipped)."""
    alpha = None if picture.alpha is None else np.clip(imresize(picture.alpha, float(scale)), 0.0, 1.0)
    return Picture(upscale_pixels(picture.pixels, scale, luma), alpha, picture.bits)


# --- the command --------------------------------------------------------------------------------


def output_path(image: Path, scale: int, out: Path | None, count: int) -> Path:
    """``<stem>_x<scale>.png`` beside ``image`` or in folder ``out``; ``out`` itself if it ends in .png."""
    name = f"{image.stem}_x{scale}.png"
    if out is None:
        return image.with_name(name)
    if out.suffix.lower() == ".png":
        if count != 1:
            raise ValueError(f"-o {out}: a file name needs exactly one input image, got {count}; give a folder")
        return out
    if out.suffix and not out.is_dir():
        raise ValueError(f"-o {out}: outputs are PNG files; give a folder or a .png name")
    return out / name


@dataclass
class Job:
    """One input ``image`` and the PNG ``target`` it is written to."""

    image: Path
    target: Path


def _entry(path: Path) -> Path:
    """The folder entry ``path`` names: its folder resolved (symlinks followed), its name kept, since a
    rename onto ``path`` replaces that entry (a symlink itself, not the file it points to)."""
    return path.parent.resolve() / path.name


def _inode(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the entry itself (a symlink is not followed); None if it does not exist."""
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def plan_outputs(
    images: list[Path], scale: int, out: Path | None, *, overwrite: bool
) -> tuple[list[Job], list[tuple[Path, str]]]:
    """The jobs to run and the ``(image, reason)`` pairs skipped, decided before any work.

    Raises ValueError, naming the files, if any output would be written over an input or two inputs
    would be written to one output name (``a/photo.png b/photo.png``, ``photo.png photo.jpg``):
    those are mistakes in the command, refused as a whole. An output that already exists is kept
    and its input skipped unless ``overwrite``; an output that is a folder is always skipped.
    """
    if out is not None and out.exists() and not out.is_dir() and out.suffix.lower() != ".png":
        raise ValueError(f"-o {out}: exists and is not a folder; give a folder or a .png name")
    jobs = [Job(image, output_path(image, scale, out, len(images))) for image in images]
    problems: list[str] = []
    by_target: dict[Path, list[Job]] = {}
    for job in jobs:
        by_target.setdefault(_entry(job.target), []).append(job)
    for group in by_target.values():
        if len(group) > 1:
            names = ", ".join(str(job.image) for job in group)
            problems.append(
                f"{names} would all be written to {group[0].target} (rename them, or upscale them into "
                "separate -o folders)"
            )
    # A rename onto the target replaces an input if it is the same folder entry, or the same inode
    # (a hard link, or another spelling on a case-insensitive file system).
    inputs = {_entry(image): image for image in images}
    inodes = {key: image for image in images if (key := _inode(image)) is not None}
    for job in jobs:
        image = inputs.get(_entry(job.target)) or inodes.get(_inode(job.target))
        if image is not None:
            problems.append(f"the output {job.target} of {job.image} is the input {image} (choose another -o)")
    if problems:
        raise ValueError("refused before any work: " + "; ".join(problems))
    todo: list[Job] = []
    skipped: list[tuple[Path, str]] = []
    for job in jobs:
        if job.target.is_dir():
            skipped.append((job.image, f"its output {job.target} is a folder"))
        elif os.path.lexists(job.target) and not overwrite:
            skipped.append((job.image, f"{job.target} exists, kept (--overwrite replaces it)"))
        else:
            todo.append(job)
    return todo, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Super-resolve images: Y through the network, Cb/Cr and alpha bicubic (MATLAB imresize). "
        "Writes <stem>_x<scale>.png (8- or 16-bit, as the input), atomically. Before any work it refuses "
        "a run that would write over an input or write two inputs to one name, and skips inputs whose "
        "output exists unless --overwrite."
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, BMP, TIFF)")
    parser.add_argument("--scale", type=int, required=True, choices=SCALES, help="upscaling factor")
    parser.add_argument(
        "--model", type=Path, help=f"trained model file (default: the released weights, {PRETRAINED_MODEL})"
    )
    parser.add_argument("-o", "--output", type=Path, help="output folder (created), or a .png name for one image")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace outputs that already exist (default: keep them, skip their inputs and exit 2 at the "
        "end); an input is never written over",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda[:N]")
    parser.add_argument(
        "--tile", type=int, default=DEFAULT_TILE, help="tile side in pixels, bounds memory (0: whole image)"
    )
    parser.add_argument(
        "--overlap", type=int, help="context pixels around each tile (default and minimum: the receptive-field radius)"
    )
    parser.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32",
        help="fp32 (default, exact) | bf16: faster on GPUs and CPUs with native bf16, 8 significant bits",
    )
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"refuse inputs declaring more pixels than this, before decoding (default {DEFAULT_MAX_PIXELS:,})",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Upscale each image; a bad or skipped image is reported and the others are done; exit 2 if any
    was not written. Outputs are planned (:func:`plan_outputs`) before the model is loaded."""
    if args.tile < 0:
        raise ValueError(f"--tile must be >= 0 (0: whole image), got {args.tile}")
    jobs, skipped = plan_outputs(args.images, args.scale, args.output, overwrite=args.overwrite)
    for image, reason in skipped:
        print(f"vdsr upscale: skipped {image}: {reason}", file=sys.stderr)
    not_written = [image for image, _ in skipped]
    if not jobs:
        return _finish(not_written, len(args.images))
    model_path = model_or_released(args.model)
    model, device = load_network(Path(model_path), args.device)
    if args.overlap is not None and args.overlap < receptive_radius(model):
        raise ValueError(
            f"--overlap {args.overlap} is below the model's receptive-field radius {receptive_radius(model)}"
        )

    def luma(bicubic_y: np.ndarray, scale: int) -> np.ndarray:
        return predict_y(model, bicubic_y, device, args.tile, args.overlap, precision=args.precision)

    for job in jobs:
        try:
            picture = read_picture(job.image, args.max_pixels)
        except ImageError as error:
            print(f"vdsr upscale: error: {error}", file=sys.stderr)
            not_written.append(job.image)
            continue
        result = upscale_picture(picture, args.scale, luma)
        try:
            write_picture(job.target, result, overwrite=args.overwrite)
        except FileExistsError:  # appeared while we worked: still not ours to replace
            print(f"vdsr upscale: skipped {job.image}: {job.target} appeared meanwhile, kept", file=sys.stderr)
            not_written.append(job.image)
            continue
        height, width = picture.pixels.shape[:2]
        log.info("%s (%dx%d) -> %s (%dx%d, %d-bit)", job.image, width, height, job.target, width * args.scale,
                 height * args.scale, result.bits)
    return _finish(not_written, len(args.images))


def _finish(not_written: list[Path], total: int) -> int:
    """Exit status 0 if every image was written, else 2 after a line naming those that were not."""
    if not not_written:
        return 0
    names = ", ".join(str(image) for image in not_written)
    print(f"vdsr upscale: {len(not_written)} of {total} images not written: {names}", file=sys.stderr)
    return 2

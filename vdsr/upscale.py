"""``vdsr upscale``: super-resolve your own images with a trained model (library code, no DVC).

Colour is handled as in SRCNN's and VDSR's demos: the image goes to YCbCr (MATLAB BT.601,
:mod:`vdsr.color`), all channels are upscaled with MATLAB's bicubic ``imresize``, and the luma
``Y`` is then replaced by the network's estimate; Cb and Cr stay bicubic. Grayscale images are
their own ``Y``. Alpha is resized bicubic, like Cb/Cr. Everything runs in float64 on the [0, 1]
scale: 16-bit PNGs keep their full precision and are written back as 16-bit PNGs, 8-bit images
as 8-bit PNGs. EXIF orientation is applied (the output is upright and has no orientation tag) and
an ICC profile is carried over.

The network sees the image in tiles with an overlap of at least its receptive-field radius, and
only each tile's interior is kept. Every output pixel then sees exactly the input it sees in
one whole-image pass -- at the image border both use the model's zero padding -- so the result
equals whole-image inference. A file is upscaled one row of tiles at a time
(:func:`upscale_source`): the bicubic planes of that band (and the rows its tiles' overlap reaches),
the network's tiles, the colour conversion and the PNG rows (:class:`vdsr.png.PngWriter`), so
memory is bounded by the tile and the picture's width, whatever its height; only the input's
samples are held whole, as stored (uint8 or uint16). Each step computes, value for value, what the
whole-image path (:func:`upscale_picture`, :func:`write_picture`) computes: the output is identical.

Pillow reads 16-bit RGB(A) PNGs as 8-bit. We decode such files twice with Pillow's own PNG
decoder, unpacking the high and then the low byte of every sample; 16-bit colour PNGs are written
by :mod:`vdsr.png`, since Pillow has no 16-bit colour modes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vdsr.color import rgb2ycbcr, ycbcr2rgb
from vdsr.evaluate import Upscaler
from vdsr.images import ImageError
from vdsr.backends import BACKENDS, DEFAULT_BACKEND, DEFAULT_PRECISION, PRECISION_CHOICES, resolve_variant, upscale_model
from vdsr.inference import (  # the network pass, shared with training's validation and evaluation
    DEFAULT_TILE,
    Network,
    load_network,
    network_numerics,
    receptive_radius,
    run_tile,
    tile_grid,
)
from vdsr.io import atomic_path
from vdsr.png import PngWriter, write_png
from vdsr.resize import _resize_axis0, contributions, imresize, output_size

log = logging.getLogger(__name__)

# Released weights will live here; until then ``--model`` is required.
PRETRAINED_MODEL = Path(__file__).resolve().parents[1] / "pretrained" / "vdsr.pt"
# Largest input accepted, in pixels, checked on the declared size before decoding (decompression
# bombs). Memory is bounded by the tile, so this guards the decoded input (16 Mpx RGB: 48 MB).
DEFAULT_MAX_PIXELS = 16_000_000
SCALES = (2, 3, 4)
CHUNK_ROWS = 64  # output rows resized / colour-converted at once inside a band: bounds the temporaries


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


# --- colour, whole images in memory -------------------------------------------------------------


def upscale_pixels(pixels: np.ndarray, scale: int, luma: Upscaler) -> np.ndarray:
    """Upscale (H, W) gray or (H, W, 3) RGB float on [0, 1] by ``scale``: ``luma`` for Y, bicubic for CbCr.

    Returns float64 (sH, sW[, 3]) on [0, 1], clipped. The whole image at once; ``vdsr upscale``
    computes the same values band by band (:func:`upscale_source`).
    """
    if pixels.ndim == 2:
        return np.clip(luma(imresize(pixels, float(scale)), scale), 0.0, 1.0)
    ycbcr = imresize(rgb2ycbcr(pixels), float(scale))  # (sH, sW, 3); Cb, Cr stay bicubic
    ycbcr[..., 0] = luma(ycbcr[..., 0], scale)
    return np.clip(ycbcr2rgb(ycbcr), 0.0, 1.0)


@dataclass
class Picture:
    """An image on the [0, 1] scale: ``pixels`` (H, W) gray or (H, W, 3) RGB float64, optional
    ``alpha`` (H, W) float64, and ``bits`` per sample (8 or 16) of the file."""

    pixels: np.ndarray
    alpha: np.ndarray | None
    bits: int


def upscale_picture(picture: Picture, scale: int, luma: Upscaler) -> Picture:
    """Upscale colour (Y by ``luma``, CbCr bicubic) and alpha (bicubic, clipped), the whole image at once."""
    alpha = None if picture.alpha is None else np.clip(imresize(picture.alpha, float(scale)), 0.0, 1.0)
    return Picture(upscale_pixels(picture.pixels, scale, luma), alpha, picture.bits)


# --- image files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What a file's header says of the picture :func:`read_source` returns: ``width`` x ``height``
    as stored (EXIF orientation, read with the pixels, may swap them), samples per pixel
    (1 gray, 2 gray + alpha, 3 RGB, 4 RGBA) and bits per sample (8 or 16)."""

    width: int
    height: int
    channels: int
    bits: int


@dataclass
class Source:
    """A decoded picture, upright, as stored: ``samples`` (H, W, C) uint8 (``bits`` 8) or uint16
    (``bits`` 16), C as :class:`Header`; ``icc``: its ICC profile, when it suits the output."""

    samples: np.ndarray
    bits: int
    icc: bytes | None = None

    @property
    def channels(self) -> int:
        return self.samples.shape[2]

    @property
    def top(self) -> float:
        """The sample value of 1.0."""
        return 65535.0 if self.bits == 16 else 255.0


@contextlib.contextmanager
def _image_errors(path: Path) -> Iterator[None]:
    """Turn what Pillow raises for a bad file into :class:`vdsr.images.ImageError` naming ``path``."""
    try:
        yield
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except Image.DecompressionBombError as error:
        raise ImageError(f"{path}: too large ({error})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageError(f"{path}: not a readable image ({error})") from None


def _open_checked(path: Path, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only), refusing a declared size over ``max_pixels`` before any decoding
    and files of several frames (animations, multi-page TIFFs: which one would be meant?)."""
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
    frames = getattr(image, "n_frames", 1)
    if frames > 1 and image.format != "MPO":  # MPO: a camera JPEG whose first frame is the picture
        image.close()
        raise ImageError(
            f"{path}: has {frames} frames (an animation or a multi-page file); vdsr upscale takes single "
            "pictures: save the frame you want as its own file"
        )
    return image


def _decoding(image: Image.Image, path: Path) -> tuple[str, int, int]:
    """How :func:`read_source` decodes ``image`` (opened, not loaded): ``png16`` (16-bit colour or
    gray + alpha PNG), ``int16`` (16- or 32-bit gray) or the Pillow mode to convert to; with the
    samples per pixel and bits per sample it gives."""
    if image.format == "PNG" and len(image.tile) == 1:
        args = image.tile[0].args
        rawmode = args if isinstance(args, str) else args[0]
        if rawmode in ("RGB;16B", "RGBA;16B", "LA;16B"):
            return "png16", {"RGB;16B": 3, "RGBA;16B": 4, "LA;16B": 2}[rawmode], 16
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return "int16", 1, 16
    if mode == "F":
        raise ImageError(f"{path}: floating-point images (mode F) are not supported")
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
    elif mode in ("1", "L"):
        mode = "L"
    elif mode in ("LA", "La"):
        mode = "LA"
    elif mode not in ("RGB", "RGBA"):  # CMYK, YCbCr, LAB, HSV, RGBX, RGBa, PA, ...
        mode = "RGBA" if "A" in mode or "a" in mode else "RGB"
    return mode, len(mode), 8


def inspect_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """The :class:`Header` of ``path``, read without decoding the pixels; :class:`ImageError` naming
    the file if it cannot be read, declares more than ``max_pixels``, has several frames or holds
    samples we do not handle."""
    path = Path(path)
    with _image_errors(path), _open_checked(path, max_pixels) as image:
        _how, channels, bits = _decoding(image, path)
        return Header(image.size[0], image.size[1], channels, bits)


def _png_16bit_samples(image: Image.Image, path: Path, channels: int) -> np.ndarray:
    """uint16 (H, W, C) samples of a 16-bit colour or gray + alpha PNG, which Pillow reads as 8 bits.

    ``image``: opened, not yet loaded (loading clears ``image.tile``).
    """
    tile = image.tile[0]
    rawmode = tile.args if isinstance(tile.args, str) else tile.args[0]
    if channels in (3, 4):  # decode twice: high bytes, then low bytes
        image.load()
        high = np.asarray(image, dtype=np.uint16)
        with Image.open(path) as again:
            again.tile = [tile._replace(args=rawmode.replace(";16B", ";16L"))]
            again.load()
            low = np.asarray(again, dtype=np.uint16)
        return high << 8 | low
    # Gray + alpha, 4 bytes a pixel: decode them as raw RGBA bytes (L hi, L lo, A hi, A lo).
    with Image.open(path) as again:
        again.tile = [tile._replace(args="RGBA")]
        again.load()
        raw = np.asarray(again, dtype=np.uint16)
    return np.stack([raw[..., 0] << 8 | raw[..., 1], raw[..., 2] << 8 | raw[..., 3]], axis=-1)


# EXIF orientation (tag 0x0112) -> what makes the stored samples upright, as PIL.ImageOps.exif_transpose.
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # mirrored
    3: lambda a: a[::-1, ::-1],  # upside down
    4: lambda a: a[::-1],  # mirrored upside down
    5: lambda a: a.swapaxes(0, 1),  # transposed
    6: lambda a: np.rot90(a, -1),  # turned a quarter clockwise to be upright
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # transversed
    8: lambda a: np.rot90(a, 1),  # a quarter counter-clockwise
}


def _icc_for_output(profile: bytes | None, channels: int, path: Path) -> bytes | None:
    """``profile`` if its colour space (ICC header bytes 16-19) is the output's (RGB or gray), else
    None with a warning (a CMYK profile cannot describe the RGB that Pillow converted CMYK to)."""
    if not profile:
        return None
    wanted = b"RGB " if channels >= 3 else b"GRAY"
    if profile[16:20] != wanted:
        log.warning("%s: its ICC profile is for %r, not %r: the output has none", path,
                    profile[16:20].decode("latin-1").strip(), wanted.decode().strip())
        return None
    return profile


def read_source(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Source:
    """Decode an image file for upscaling, upright (EXIF orientation applied), its samples as stored;
    :class:`vdsr.images.ImageError` naming the file if it cannot. Images declaring more than
    ``max_pixels`` pixels are refused from their header, before decoding."""
    path = Path(path)
    with _image_errors(path), _open_checked(path, max_pixels) as image:
        how, channels, bits = _decoding(image, path)
        if how == "png16":
            samples = _png_16bit_samples(image, path, channels)
        elif how == "int16":
            image.load()
            gray = np.asarray(image)
            if gray.min() < 0 or gray.max() > 65535:
                raise ImageError(f"{path}: 32-bit integer samples outside 0..65535 are not supported")
            samples = gray.astype(np.uint16)[..., None]
        else:
            image.load()
            samples = np.asarray(image.convert(how)).reshape(image.size[1], image.size[0], channels)
        orientation = image.getexif().get(0x0112, 1)
        icc = _icc_for_output(image.info.get("icc_profile"), channels, path)
    upright = _UPRIGHT.get(orientation)
    if upright is not None:
        samples = np.ascontiguousarray(upright(samples))
    return Source(samples, bits, icc)


def read_picture(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """:func:`read_source` as a :class:`Picture` on the [0, 1] scale (float64 planes)."""
    source = read_source(path, max_pixels)
    data = source.samples.astype(np.float64) / source.top
    alpha = data[..., -1] if source.channels in (2, 4) else None
    return Picture(data[..., :3] if source.channels >= 3 else data[..., 0], alpha, source.bits)


def write_png16(path: Path, samples: np.ndarray) -> None:
    """Write uint16 (H, W) gray, (H, W, 2) gray+alpha, (H, W, 3) RGB or (H, W, 4) RGBA as a 16-bit PNG."""
    if samples.dtype != np.uint16:
        raise TypeError(f"write_png16 expects uint16 samples, got {samples.dtype}")
    with open(path, "wb") as handle:
        write_png(handle, samples)


def _quantised(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Samples on [0, 1] as uint8 or uint16: rounded, clipped."""
    top = 65535.0 if bits == 16 else 255.0
    return np.clip(np.round(pixels * top), 0, top).astype(np.uint16 if bits == 16 else np.uint8)


@contextlib.contextmanager
def _atomic_output(path: Path, overwrite: bool) -> Iterator[Path]:
    """:func:`vdsr.io.atomic_path` for an output: errors name ``path``; FileExistsError, before the
    rename, if ``path`` exists (it may have appeared meanwhile) and not ``overwrite``."""
    with atomic_path(path) as tmp:
        try:
            yield tmp
        except OSError as error:  # disk full, file size limit: the error names no file by itself
            if error.filename is None or error.filename == str(tmp):
                raise OSError(error.errno, error.strerror, str(path)) from None
            raise
        if not overwrite and os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists (--overwrite replaces it)", str(path))


def write_picture(path: Path, picture: Picture, *, overwrite: bool = False, icc: bytes | None = None) -> None:
    """Write ``picture`` as a PNG with its bit depth (8 or 16) and alpha, atomically (temporary name,
    then rename). FileExistsError if ``path`` exists and not ``overwrite``."""
    planes = [picture.pixels] if picture.pixels.ndim == 2 else [picture.pixels[..., c] for c in range(3)]
    if picture.alpha is not None:
        planes.append(picture.alpha)
    data = np.stack(planes, axis=-1) if len(planes) > 1 else planes[0]
    with _atomic_output(Path(path), overwrite) as tmp, open(tmp, "wb") as handle:
        write_png(handle, _quantised(data, picture.bits), icc=icc)


# --- band by band -------------------------------------------------------------------------------


def _unit_planes(source: Source, i0: int, i1: int) -> np.ndarray:
    """Input rows ``i0:i1`` of the planes that are resized, float64 (n, W, P) on [0, 1]: Y, Cb, Cr
    (MATLAB BT.601) or the gray level, then alpha if any."""
    data = source.samples[i0:i1].astype(np.float64) / source.top
    if source.channels < 3:
        return data
    ycbcr = rgb2ycbcr(data[..., :3])
    return ycbcr if source.channels == 3 else np.concatenate([ycbcr, data[..., 3:]], axis=2)


def bicubic_rows(source: Source, scale: int, r0: int, r1: int) -> np.ndarray:
    """Output rows ``r0:r1`` of the ``scale`` x MATLAB-bicubic planes (:func:`_unit_planes`), float64
    (r1 - r0, sW, P), reading only the input rows their kernels reach.

    Equal bit for bit to those rows of :func:`vdsr.resize.imresize` of the whole planes: each value
    is the same sum, in the same order, of the same products (the passes are elementwise).
    """
    height, width = source.samples.shape[:2]
    out_height, out_width = output_size(height, scale), output_size(width, scale)
    weights, indices = contributions(height, out_height, float(scale))
    weights, indices = weights[r0:r1], indices[r0:r1]
    i0, i1 = int(indices.min()), int(indices.max()) + 1
    planes = _unit_planes(source, i0, i1)  # (i1 - i0, W, P)
    count, depth = r1 - r0, planes.shape[2]
    rows = _resize_axis0(planes.reshape(i1 - i0, -1), weights, indices - i0)  # (count, W * P)
    rows = rows.reshape(count, width, depth).transpose(1, 0, 2).reshape(width, -1)  # (W, count * P)
    cols = _resize_axis0(rows, *contributions(width, out_width, float(scale)))  # (sW, count * P)
    return cols.reshape(out_width, count, depth).transpose(1, 0, 2)


def _output_rows(luma: np.ndarray, rest: np.ndarray, source: Source) -> np.ndarray:
    """Output samples (n, sW, C) of the network's luma (n, sW) float32 and the bicubic Cb, Cr and
    alpha (n, sW, P - 1) float64, as :func:`upscale_picture` and :func:`write_picture` compute them."""
    y = luma.astype(np.float64)
    if source.channels >= 3:
        ycbcr = np.concatenate([y[..., None], rest[..., :2]], axis=2)
        pixels = np.clip(ycbcr2rgb(ycbcr), 0.0, 1.0)
    else:
        pixels = np.clip(y, 0.0, 1.0)[..., None]
    if source.channels in (2, 4):
        pixels = np.concatenate([pixels, np.clip(rest[..., -1:], 0.0, 1.0)], axis=2)
    return _quantised(pixels, source.bits)


def upscale_source(
    source: Source, scale: int, network: Network, writer: PngWriter, on_tile: Callable[[], None] = lambda: None
) -> None:
    """Upscale ``source`` by ``scale`` into ``writer``, one row of the network's tiles at a time.

    For each band: the bicubic planes of its rows plus the overlap above and below (the luma, as
    float32 for the network) in chunks of :data:`CHUNK_ROWS`; the network on each tile of the band
    (the windows :func:`predict_y` uses on the whole image, so the same values); then colour and
    quantisation, chunk by chunk, and the rows go to ``writer``. ``on_tile`` is called after each tile.
    Call under :func:`network_numerics`.
    """
    height, width = source.samples.shape[:2]
    out_height, out_width = output_size(height, scale), output_size(width, scale)
    for row in tile_grid(out_height, out_width, network.tile, network.overlap):
        top, bottom, t0, b0 = row[0].top, row[0].bottom, row[0].t0, row[0].b0
        y32 = np.empty((b0 - t0, out_width), np.float32)
        rest = np.empty((bottom - top, out_width, source.channels - 1), np.float64)
        for c0 in range(t0, b0, CHUNK_ROWS):
            c1 = min(c0 + CHUNK_ROWS, b0)
            planes = bicubic_rows(source, scale, c0, c1)
            y32[c0 - t0 : c1 - t0] = planes[..., 0]
            lo, hi = max(c0, top), min(c1, bottom)
            if lo < hi:
                rest[lo - top : hi - top] = planes[lo - c0 : hi - c0, :, 1:]
        luma = np.empty((bottom - top, out_width), np.float32)
        for box in row:
            luma[:, box.left : box.right] = run_tile(network.model, y32, box, network.device, t0,
                                                     self_ensemble=network.self_ensemble)
            on_tile()
        del y32
        for c0 in range(0, bottom - top, CHUNK_ROWS):
            samples = _output_rows(luma[c0 : c0 + CHUNK_ROWS], rest[c0 : c0 + CHUNK_ROWS], source)
            writer.write(samples if source.channels > 1 else samples[..., 0])


# --- memory -------------------------------------------------------------------------------------


def memory_needed(header: Header, scale: int, network: Network) -> int:
    """Bytes :func:`read_source` and :func:`upscale_source` need at most for ``header``'s picture, on
    top of the loaded model (an estimate, measured by ``bench/upscale_memory.py``).

    The decoded input (Pillow's image, our copy, a conversion and an orientation copy); the band: the
    float32 luma with its overlap, the network's luma, the float64 Cb/Cr/alpha and the chunk
    temporaries; and, on the CPU, the network on one window: the feature maps of its widest layer
    that the variant holds at once (:func:`activation_maps`; on a GPU they are in its memory, not counted here).
    The band's width is the picture's longer side (orientation is not read from the header).
    """
    pixels = header.width * header.height
    sample_bytes = header.bits // 8
    decode = pixels * header.channels * sample_bytes * 4 + (pixels * 4 * 2 if header.bits == 16 else 0)
    out_height, out_width = (output_size(side, scale) for side in sorted((header.width, header.height)))
    rows = min(network.tile or out_height, out_height)
    margin_rows = min(rows + 2 * network.overlap, out_height)
    band = out_width * (margin_rows * 4 + rows * 4 + rows * 8 * (header.channels - 1))
    chunk = out_width * min(CHUNK_ROWS, margin_rows) * 8 * 4 * 6
    side = network.tile + 2 * network.overlap
    window = min(side, out_height) * min(side, out_width) if network.tile else out_height * out_width
    if network.device.type == "cpu":
        maps, value_bytes = activation_maps(network.backend, network.precision)
        activations = window * (maps * network.channels() * value_bytes + 4 * 2)
    else:  # the activations live in the device's memory; here only the window and its estimate
        activations = window * 4 * 2
    return decode + band + chunk + activations


def activation_maps(backend: str, precision: str) -> tuple[int, int]:
    """Feature maps of the widest layer held at once on the CPU, and bytes per value, for a variant.

    Measured with bench/upscale_memory.py (``--tile 0``, peak RSS over an 8x8 picture's, less the
    bands' share; docs/upscaling-speed.md): NCHW, where oneDNN reorders each layer's input and output
    to its blocked layout (VDSR 20x64 on a 552^2 window: 4.1 maps; depth 3 width 4, whose 4
    channels are padded: 5.7 in fp32, 2.6 fp32 maps' worth in bf16) -> 5 fp32 maps; channels_last,
    where oneDNN convolves NHWC without reordering (width 4: 1.7 maps in fp32, 0.6 fp32 maps' worth
    in bf16) -> 3 maps at the precision's bytes. ONNX Runtime and OpenVINO keep their own arenas
    (width 4: ONNX Runtime 5.0 fp32 maps, OpenVINO 2.4 in fp32 and 1.4 fp32 maps' worth in bf16)
    -> the NCHW figure, 5 fp32 maps."""
    if backend in ("torch", "torch-compile"):
        return 3, 2 if precision == "bf16" else 4
    return 5, 4


def available_memory() -> int | None:
    """Bytes that can still be allocated now: MemAvailable (/proc/meminfo), lowered to what this
    process's cgroup leaves (v2 ``memory.max`` - ``memory.current``, v1 ``limit_in_bytes`` -
    ``usage_in_bytes``); None where neither can be read (not Linux)."""
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, group = line.split(":", 2)
            if hierarchy == "0":  # v2
                folder = Path("/sys/fs/cgroup") / group.lstrip("/")
                limit, usage = folder / "memory.max", folder / "memory.current"
            elif "memory" in controllers.split(","):  # v1
                folder = Path("/sys/fs/cgroup/memory") / group.lstrip("/")
                limit, usage = folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes"
            else:
                continue
            if limit.is_file() and limit.read_text().strip() != "max":
                found.append(int(limit.read_text()) - int(usage.read_text()))
    return min(found) if found else None


def parse_bytes(text: str) -> int:
    """``2G``, ``500M``, ``64K`` (powers of 1024) or a plain number of bytes; argparse's type for --max-memory."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    number = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = units.get(number[-1:], 1)
    try:
        value = float(number[:-1] if number[-1:] in units else number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes like 2G, 500M or 1000000, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(value)


def format_bytes(count: int) -> str:
    """``1.5 GiB``, ``300 MiB``: what a user reads."""
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{count / 2**20:.0f} MiB"


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
        "Writes <stem>_x<scale>.png (8- or 16-bit, as the input), upright, with the input's ICC profile, "
        "atomically. Before any work it refuses a run that would write over an input or write two "
        "inputs to one name, and skips inputs whose output exists unless --overwrite. Memory is bounded "
        "by --tile and the picture's width; a picture needing more than there is is skipped. On a terminal, "
        "progress bars show each picture's tiles and the batch, with the time left."
    )
    parser.add_argument(
        "images", nargs="+", type=Path, metavar="IMAGE",
        help="image files (PNG, JPEG, BMP, TIFF; one frame: animations and multi-page files are refused)",
    )
    parser.add_argument("--scale", type=int, required=True, choices=SCALES, help="upscaling factor")
    parser.add_argument(
        "--model", type=Path, help=f"trained model file (default: the released weights, {PRETRAINED_MODEL})"
    )
    parser.add_argument("-o", "--output", type=Path, help="output folder (created), or a .png name for one image "
                        "(default: beside each input, as <stem>_x<scale>.png)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace outputs that already exist (default: keep them, skip their inputs and exit 2 at the "
        "end); an input is never written over",
    )
    parser.add_argument("--device", default="auto", help="auto (default: cuda if present) | cpu | cuda[:N]")
    parser.add_argument(
        "--tile", type=int, default=DEFAULT_TILE,
        help=f"tile side in pixels of the output: bounds memory, with the picture's width (0: whole image; "
        f"default {DEFAULT_TILE})",
    )
    parser.add_argument(
        "--overlap", type=int, help="context pixels around each tile (default and minimum: the receptive-field radius)"
    )
    parser.add_argument(
        "--backend", choices=("auto", *BACKENDS), default=DEFAULT_BACKEND,
        help="how the network runs: auto (default: openvino if installed, else torch), torch (eager, "
        "weights in channels_last), torch-nchw (eager NCHW: with fp32, the exact pass evaluation uses), "
        "torch-compile, onnxruntime (extra onnx, fp32), openvino (extra openvino); docs/upscaling-speed.md",
    )
    parser.add_argument(
        "--precision", choices=PRECISION_CHOICES, default=DEFAULT_PRECISION,
        help="auto (default: the fastest within 0.02 dB of exact fp32 on Set5 and Set14 at every scale, "
        "measured by bench/upscale.py: bf16 where the CPU computes it natively, AVX-512 BF16 or AMX, "
        "else fp32; fp32 for torch-nchw, onnxruntime and on a GPU) | fp32 | bf16; "
        "--backend torch-nchw --precision fp32 gives the exact output",
    )
    parser.add_argument(
        "--self-ensemble", action="store_true",
        help="x8 self-ensemble (VDSR+): average the network over the 8 flips/rotations of the picture; "
        "8x the time, usually a few hundredths of a dB more PSNR",
    )
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"refuse inputs declaring more pixels than this, before decoding (default {DEFAULT_MAX_PIXELS:,})",
    )
    parser.add_argument(
        "--max-memory", type=parse_bytes, metavar="BYTES",
        help="skip a picture whose estimated memory need is over this, e.g. 4G (default: the memory "
        "available when its turn comes)",
    )
    parser.set_defaults(run=run)


def _say(message: str) -> None:
    """One line on stderr, above the progress bars."""
    from tqdm import tqdm

    tqdm.write(f"vdsr upscale: {message}", file=sys.stderr)


def _tiles(header: Header, scale: int, network: Network) -> int:
    """Tiles of the output (the count does not depend on the orientation)."""
    out_width, out_height = output_size(header.width, scale), output_size(header.height, scale)
    tile = network.tile or max(out_width, out_height)
    return -(-out_width // tile) * -(-out_height // tile)


def run(args: argparse.Namespace) -> int:
    """Upscale each image; a bad or skipped image is reported and the others are done; exit 2 if any
    was not written. Outputs (:func:`plan_outputs`) and inputs' headers (:func:`inspect_image`) are
    checked before the model is loaded."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    if args.tile < 0:
        raise ValueError(f"--tile must be >= 0 (0: whole image), got {args.tile}")
    jobs, skipped = plan_outputs(args.images, args.scale, args.output, overwrite=args.overwrite)
    for image, reason in skipped:
        _say(f"skipped {image}: {reason}")
    not_written = [image for image, _ in skipped]
    ready: list[tuple[Job, Header]] = []
    for job in jobs:
        try:
            ready.append((job, inspect_image(job.image, args.max_pixels)))
        except ImageError as error:
            _say(f"error: {error}")
            not_written.append(job.image)
    if not ready:
        return _finish(not_written, len(args.images))
    model, device = load_network(Path(model_or_released(args.model)), args.device, scale=args.scale)
    radius = receptive_radius(model)
    if args.overlap is not None and args.overlap < radius:
        raise ValueError(f"--overlap {args.overlap} is below the model's receptive-field radius {radius}")
    overlap = radius if args.overlap is None else args.overlap
    variant = resolve_variant(args.backend, args.precision, device)
    log.info("network: %s on %s", variant.name, device)
    network = Network(upscale_model(model, variant), device, args.tile, overlap, variant.precision,
                      args.self_ensemble, variant.backend)
    if args.self_ensemble:
        _say("x8 self-ensemble: each tile through the 8 flips/rotations, averaged (8x the time)")
    counts = [_tiles(header, args.scale, network) for _, header in ready]
    with logging_redirect_tqdm(), tqdm(
        total=sum(counts), desc=f"{len(ready)} images", unit="tile", disable=None if len(ready) > 1 else True
    ) as batch:
        for (job, header), count in zip(ready, counts):
            if not upscale_job(job, header, network, args, lambda: batch.update()):
                not_written.append(job.image)
                batch.total -= count
                batch.refresh()
    return _finish(not_written, len(args.images))


def upscale_job(job: Job, header: Header, network: Network, args: argparse.Namespace,
                on_tile: Callable[[], None]) -> bool:
    """Upscale one image into its target; False, after a line saying why, if it was not written."""
    from tqdm import tqdm

    need = memory_needed(header, args.scale, network)
    limit = args.max_memory if args.max_memory is not None else available_memory()
    if limit is not None and need > limit:
        given = "of --max-memory" if args.max_memory is not None else "available"
        _say(f"skipped {job.image}: needs about {format_bytes(need)} for {header.width}x{header.height} at "
             f"x{args.scale} with --tile {network.tile}, over the {format_bytes(limit)} {given} "
             f"({'a' if not network.tile else 'a smaller'} --tile needs less)")
        return False
    try:
        source = read_source(job.image, args.max_pixels)
    except ImageError as error:
        _say(f"error: {error}")
        return False
    height, width = source.samples.shape[:2]
    out_height, out_width = output_size(height, args.scale), output_size(width, args.scale)
    try:
        with _atomic_output(job.target, args.overwrite) as tmp, open(tmp, "wb") as handle:
            writer = PngWriter(handle, out_width, out_height, source.channels, source.bits, icc=source.icc)
            with tqdm(total=_tiles(header, args.scale, network), desc=job.image.name, unit="tile", leave=False,
                      disable=None) as bar, network_numerics(network.device, network.precision):
                upscale_source(source, args.scale, network, writer, lambda: (bar.update(), on_tile()))
            writer.close()
    except FileExistsError:  # appeared while we worked: still not ours to replace
        _say(f"skipped {job.image}: {job.target} appeared meanwhile, kept")
        return False
    log.info("%s (%dx%d) -> %s (%dx%d, %d-bit)", job.image, width, height, job.target, out_width, out_height,
             source.bits)
    return True


def _finish(not_written: list[Path], total: int) -> int:
    """Exit status 0 if every image was written, else 2 after a line naming those that were not."""
    if not not_written:
        return 0
    names = ", ".join(str(image) for image in not_written)
    _say(f"{len(not_written)} of {total} images not written: {names}")
    return 2

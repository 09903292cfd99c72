"""A streaming PNG writer: rows go out band by band, so memory holds a band, never the whole picture.

Follows the PNG specification (ISO/IEC 15948, W3C PNG 2nd edition): gray (colour type 0), gray +
alpha (4), RGB (2) and RGBA (6) at 8 or 16 bits per sample, big-endian samples, one filter byte per
row, a zlib stream (``zlib.compressobj``) split over IDAT chunks, an optional ICC profile (iCCP)
before them. Each row gets the filter (None, Sub, Up, Average, Paeth) whose bytes, read as signed,
have the smallest sum of magnitudes: the heuristic the specification suggests and libpng and
Pillow use, so files come out about the size Pillow writes. Pillow cannot encode a picture in
parts, nor 16-bit colour at all.
"""

from __future__ import annotations

import struct
import zlib
from typing import BinaryIO

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # samples per pixel -> IHDR colour type
IDAT_BYTES = 1 << 20  # compressed bytes gathered before an IDAT chunk goes out
FILTER_ROWS = 64  # rows filtered at once: bounds the five candidates' memory


def chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The Paeth predictor of left ``a``, up ``b`` and upper-left ``c`` (int16 arrays)."""
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_rows(rows: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    """Filtered scanlines (n, 1 + L) uint8 of raw rows (n, L) uint8 below the row ``prior`` (L,).

    ``bpp``: bytes per pixel (the filters' left neighbour distance). ``prior`` is zeros above row 0.
    """
    raw = rows.astype(np.int16)
    up = np.vstack([prior[None].astype(np.int16), raw[:-1]])
    left = np.zeros_like(raw)
    left[:, bpp:] = raw[:, :-bpp]
    upper_left = np.zeros_like(raw)
    upper_left[:, bpp:] = up[:, :-bpp]
    predictions = (0, left, up, (left + up) >> 1, _paeth(left, up, upper_left))
    candidates = np.stack([(raw - p) & 0xFF for p in predictions])  # (5, n, L): each filter's bytes
    cost = np.minimum(candidates, 256 - candidates).sum(axis=2, dtype=np.int64)  # sum of |signed byte|
    best = np.argmin(cost, axis=0)  # (n,): the first of equal costs, None before the others
    chosen = np.take_along_axis(candidates, best[None, :, None], axis=0)[0].astype(np.uint8)
    return np.hstack([best.astype(np.uint8)[:, None], chosen])


class PngWriter:
    """Write a ``width`` x ``height`` PNG of ``channels`` samples at ``bits`` (8 or 16) to ``handle``.

    Call :meth:`write` with bands of rows, top to bottom, then :meth:`close`. ``icc``: an ICC profile
    to embed (iCCP, named ``icc``).
    """

    def __init__(
        self, handle: BinaryIO, width: int, height: int, channels: int, bits: int, *,
        icc: bytes | None = None, level: int = 6,
    ) -> None:
        if channels not in COLOUR_TYPES or bits not in (8, 16) or width < 1 or height < 1:
            raise ValueError(f"PNG of {width}x{height}, {channels} channels, {bits} bits is not supported")
        self.handle, self.width, self.height, self.channels, self.bits = handle, width, height, channels, bits
        self.bpp = channels * bits // 8
        self.rows_written = 0
        self.prior = np.zeros(width * self.bpp, np.uint8)
        self.compressor = zlib.compressobj(level)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        header = struct.pack(">IIBBBBB", width, height, bits, COLOUR_TYPES[channels], 0, 0, 0)
        handle.write(SIGNATURE + chunk(b"IHDR", header))
        if icc:
            handle.write(chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(icc)))

    def write(self, samples: np.ndarray) -> None:
        """Append rows: (n, width) for one channel, else (n, width, channels); uint8 or uint16 as ``bits``."""
        dtype = np.uint8 if self.bits == 8 else np.uint16
        expected = (self.width,) if self.channels == 1 else (self.width, self.channels)
        if samples.dtype != dtype or samples.shape[1:] != expected:
            raise ValueError(f"rows of shape (n, {', '.join(map(str, expected))}) {np.dtype(dtype)} expected, "
                             f"got {samples.shape} {samples.dtype}")
        if self.rows_written + len(samples) > self.height:
            raise ValueError(f"more than the {self.height} rows of the picture")
        for start in range(0, len(samples), FILTER_ROWS):
            part = samples[start : start + FILTER_ROWS]
            raw = part.astype(">u2" if self.bits == 16 else np.uint8).reshape(len(part), -1).view(np.uint8)
            self._deflate(self.compressor.compress(filter_rows(raw, self.prior, self.bpp).tobytes()))
            self.prior = raw[-1].copy()
        self.rows_written += len(samples)

    def _deflate(self, data: bytes, final: bool = False) -> None:
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes >= IDAT_BYTES or (final and self.pending_bytes):
            self.handle.write(chunk(b"IDAT", b"".join(self.pending)))
            self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        """Finish the zlib stream and the file; ValueError if rows are missing."""
        if self.rows_written != self.height:
            raise ValueError(f"{self.rows_written} of the picture's {self.height} rows were written")
        self._deflate(self.compressor.flush(), final=True)
        self.handle.write(chunk(b"IEND", b""))


def write_png(handle: BinaryIO, samples: np.ndarray, *, icc: bytes | None = None) -> None:
    """Write uint8 or uint16 (H, W) gray, (H, W, 2) gray+alpha, (H, W, 3) RGB or (H, W, 4) RGBA."""
    if samples.dtype not in (np.uint8, np.uint16) or samples.ndim not in (2, 3):
        raise ValueError(f"write_png expects (H, W[, C]) uint8 or uint16 samples, got {samples.shape} {samples.dtype}")
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    writer = PngWriter(handle, samples.shape[1], samples.shape[0], channels, samples.dtype.itemsize * 8, icc=icc)
    writer.write(samples if channels > 1 or samples.ndim == 2 else samples[..., 0])
    writer.close()

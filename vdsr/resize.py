"""MATLAB-compatible bicubic ``imresize``: the degradation every SR paper's numbers assume.

A port of the algorithm of MATLAB's ``imresize(img, scale, 'bicubic')`` (Image Processing
Toolbox): Keys' cubic kernel with a = -0.5, output size ``ceil(scale * size)``, the kernel widened
by ``1/scale`` when shrinking (antialiasing, on by default as in MATLAB), symmetric padding at the
borders. PIL's and OpenCV's bicubic filters differ from it (no antialiasing, a = -0.75, other
border rules) and give other PSNRs, which is why the field uses this one.

Each axis is resized as a weighted sum of a few gathered input rows (``contributions``: the weights
and indices depend only on the sizes and the scale, so they are cached).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

KERNEL_WIDTH = 4.0  # support of the bicubic kernel in input pixels, as MATLAB's 'bicubic'


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic`` in ``imresize.m``)."""
    absx = np.abs(x)
    absx2 = absx * absx
    absx3 = absx2 * absx
    return (1.5 * absx3 - 2.5 * absx2 + 1.0) * (absx <= 1) + (
        -0.5 * absx3 + 2.5 * absx2 - 4.0 * absx + 2.0
    ) * ((absx > 1) & (absx <= 2))


@lru_cache(maxsize=256)
def contributions(in_length: int, out_length: int, scale: float, antialiasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weights and 0-based input indices, each (out_length, taps), of MATLAB ``contributions``.

    Follows ``imresize.m``: output pixel ``x`` (1-based) maps to input coordinate
    ``u = x / scale + 0.5 * (1 - 1 / scale)``; when shrinking with antialiasing the kernel is
    ``scale * cubic(scale * d)`` over a width of ``4 / scale``; the weights of each output pixel
    are normalised to sum to one; indices outside the image are mirrored (symmetric padding);
    taps whose weight is zero for every output pixel are dropped.
    """
    if scale < 1 and antialiasing:
        kernel_width = KERNEL_WIDTH / scale
        kernel = lambda d: scale * cubic(scale * d)  # noqa: E731  (MATLAB's h = @(x) scale * cubic(scale * x))
    else:
        kernel_width = KERNEL_WIDTH
        kernel = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # 1-based, may fall outside
    weights = kernel(u[:, None] - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    # Symmetric padding: index sequence 1..n, n..1 repeated (MATLAB's aux / mod trick).
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices0 = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    used = np.any(weights != 0, axis=0)
    weights, indices0 = weights[:, used], indices0[:, used]
    weights.setflags(write=False)
    indices0.setflags(write=False)
    return weights, indices0


def resize_matrix(in_length: int, out_length: int, scale: float, antialiasing: bool = True) -> np.ndarray:
    """The dense (out_length, in_length) matrix ``W`` with ``resize(v) = W @ v`` along one axis."""
    weights, indices = contributions(in_length, out_length, scale, antialiasing)
    matrix = np.zeros((out_length, in_length), dtype=np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_length), weights.shape[1]), indices.ravel()), weights.ravel())
    return matrix


def _resize_axis0(data: np.ndarray, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """out[i] = sum_k weights[i, k] * data[indices[i, k]] for a (L, ...) array."""
    out = weights[:, 0, None] * data[indices[:, 0]]
    for k in range(1, weights.shape[1]):
        out += weights[:, k, None] * data[indices[:, k]]
    return out


def output_size(in_length: int, scale: float) -> int:
    """MATLAB's output length ``ceil(scale * in_length)``, guarded against 1/3-style rounding."""
    return int(math.ceil(round(scale * in_length, 9)))


def imresize(image: np.ndarray, scale: float, *, antialiasing: bool = True) -> np.ndarray:
    """Resize a (H, W) or (H, W, C) image by ``scale`` exactly as MATLAB ``imresize(.., 'bicubic')``.

    Float input (any range) is resized in float64 and returned as float64, unclipped. uint8 input is
    returned as uint8, rounded and clipped to [0, 255], as MATLAB does for that class (MATLAB
    rounds between the two axis passes too; we do not, which changes at most a last bit).
    Axes are resized height first, then width.
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"imresize expects a (H, W) or (H, W, C) array, got shape {image.shape}")
    if not scale > 0:
        raise ValueError(f"imresize scale must be > 0, got {scale}")
    height, width = image.shape[:2]
    out_height, out_width = output_size(height, scale), output_size(width, scale)
    data = image.astype(np.float64, copy=False)
    flat = data.reshape(height, -1)  # (H, W*C): resize rows first
    rows = _resize_axis0(flat, *contributions(height, out_height, float(scale), antialiasing))
    rows = rows.reshape(out_height, width, -1).transpose(1, 0, 2).reshape(width, -1)  # (W, out_h*C)
    cols = _resize_axis0(rows, *contributions(width, out_width, float(scale), antialiasing))
    out = cols.reshape(out_width, out_height, -1).transpose(1, 0, 2).reshape(out_height, out_width, *image.shape[2:])
    if image.dtype == np.uint8:
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)

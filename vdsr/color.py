"""Colour conversion and mod-crop as the super-resolution literature does them (MATLAB).

``rgb2ycbcr`` and ``ycbcr2rgb`` follow MATLAB's functions of those names: ITU-R BT.601 "studio
swing", Y in [16, 235] and Cb/Cr in [16, 240] on the 8-bit scale,

    Y  =  16 + ( 65.481 R + 128.553 G +  24.966 B)
    Cb = 128 + (-37.797 R -  74.203 G + 112.0   B)
    Cr = 128 + (112.0   R -  93.786 G -  18.214 B)      with R, G, B in [0, 1].

OpenCV's ``cvtColor(.., COLOR_RGB2YCrCb)`` and PIL's ``convert('YCbCr')`` use the full range
[0, 255] instead and give different PSNRs. Like MATLAB, the functions keep the input's class:
uint8 in gives uint8 out (rounded), float in [0, 1] gives float on the [0, 1] scale.
Channel order is an explicit argument: ``'rgb'`` (PIL, this project) or ``'bgr'`` (OpenCV).
"""

from __future__ import annotations

import numpy as np

# Rows: Y, Cb, Cr; columns: R, G, B; on the 8-bit scale for R, G, B in [0, 1].
RGB_TO_YCBCR = np.array(
    [
        [65.481, 128.553, 24.966],
        [-37.797, -74.203, 112.0],
        [112.0, -93.786, -18.214],
    ]
)
YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])
YCBCR_TO_RGB = np.linalg.inv(RGB_TO_YCBCR)


def _to_unit_float(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float64, copy=False)
    raise TypeError(f"expected a uint8 image or a float image in [0, 1], got dtype {image.dtype}")


def _from_unit_float(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    if like.dtype == np.uint8:
        return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    return image


def _rgb_view(image: np.ndarray, channel_order: str) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) colour image, got shape {image.shape}")
    if channel_order == "rgb":
        return image
    if channel_order == "bgr":
        return image[..., ::-1]
    raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {channel_order!r}")


def rgb2ycbcr(image: np.ndarray, *, channel_order: str = "rgb") -> np.ndarray:
    """(H, W, 3) RGB -> (H, W, 3) YCbCr as MATLAB ``rgb2ycbcr`` (BT.601, Y in [16, 235]/255).

    uint8 [0, 255] in -> uint8 out, rounded; float [0, 1] in -> float64 out on the [0, 1] scale.
    """
    rgb = _to_unit_float(_rgb_view(image, channel_order))
    ycbcr = (rgb @ RGB_TO_YCBCR.T + YCBCR_OFFSET) / 255.0
    return _from_unit_float(ycbcr, image)


def ycbcr2rgb(image: np.ndarray, *, channel_order: str = "rgb") -> np.ndarray:
    """(H, W, 3) YCbCr -> (H, W, 3) RGB, the inverse of :func:`rgb2ycbcr` (MATLAB ``ycbcr2rgb``).

    uint8 in -> uint8 out (rounded, clipped); float in -> float64 out, unclipped, on [0, 1].
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) YCbCr image, got shape {image.shape}")
    ycbcr = _to_unit_float(image) * 255.0
    rgb = (ycbcr - YCBCR_OFFSET) @ YCBCR_TO_RGB.T
    rgb = _from_unit_float(rgb, image)
    return rgb if channel_order == "rgb" else _rgb_view(rgb, channel_order)


def rgb2y(image: np.ndarray, *, channel_order: str = "rgb") -> np.ndarray:
    """Luma Y of an (H, W, 3) RGB image, MATLAB's ``rgb2ycbcr(..)(:, :, 1)``; same class rules.

    A (H, W) grayscale image is returned unchanged: the literature (e.g. Set14's bridge) treats
    its grey level as Y.
    """
    if image.ndim == 2:
        return image
    rgb = _to_unit_float(_rgb_view(image, channel_order))
    luma = (rgb @ RGB_TO_YCBCR[0] + YCBCR_OFFSET[0]) / 255.0
    return _from_unit_float(luma, image)


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """Crop (H, W[, C]) from the bottom/right to multiples of ``scale`` (MATLAB ``modcrop``)."""
    if scale < 1:
        raise ValueError(f"modcrop scale must be >= 1, got {scale}")
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]

"""The network pass beside the plain one: the x8 self-ensemble ("VDSR+").

Self-ensemble (Timofte, Rothe & Van Gool 2016, "Seven ways to improve example-based single image
super resolution"; the "+" models of EDSR, Lim et al. 2017): the network runs on the 8 images of
the input under the symmetries of the square (identity, 3 rotations, their 4 mirror images), each
output is mapped back by the inverse symmetry, and the 8 are averaged. VDSR's input is the bicubic
upscale, and MATLAB's bicubic ``imresize`` commutes with flips and transposes (its kernel and
sampling grid are symmetric), so transforming the bicubic luma is transforming the LR image.

Each pass is the plain one (exact fp32 in evaluation), the mean is taken in float64; the cost is
8 passes. The numbers it gives are reported as their own row, "VDSR+ (x8 self-ensemble)", never
mixed with the plain model's.
"""

from __future__ import annotations

import numpy as np

from vdsr.evaluate import Upscaler

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


def self_ensemble(luma: Upscaler) -> Upscaler:
    """An :data:`vdsr.evaluate.Upscaler` that averages ``luma`` over the 8 symmetries (8x its cost)."""

    def ensembled(bicubic_y: np.ndarray, scale: int) -> np.ndarray:
        total = np.zeros(bicubic_y.shape, dtype=np.float64)
        for k in range(SYMMETRIES):
            estimate = luma(np.ascontiguousarray(dihedral(bicubic_y, k)), scale)
            total += undo_dihedral(np.asarray(estimate, dtype=np.float64), k)
        return total / SYMMETRIES

    return ensembled

"""The field's conventions, each against an independent computation or published numbers."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.color import rgb2ycbcr as skimage_rgb2ycbcr
from skimage.metrics import structural_similarity

from vdsr.color import modcrop, rgb2y, rgb2ycbcr, ycbcr2rgb
from vdsr.evaluate import bicubic_upscaler, evaluate_folder, summary
from vdsr.metrics import psnr, ssim
from vdsr.paper import TABLE3
from vdsr.resize import cubic, imresize, resize_matrix

rng = np.random.default_rng(0)


def matlab_imresize_1d_reference(signal: np.ndarray, scale: float) -> np.ndarray:
    """imresize.m along one axis, written as a plain loop over output pixels (slow, obvious)."""
    n = len(signal)
    out_len = int(np.ceil(n * scale))
    width = 4.0 / scale if scale < 1 else 4.0
    out = np.zeros(out_len)
    for x in range(1, out_len + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        total, weight_sum = 0.0, 0.0
        for j in range(int(np.floor(u - width / 2)), int(np.floor(u - width / 2)) + int(np.ceil(width)) + 2):
            d = u - j
            w = scale * cubic(np.array(scale * d)) if scale < 1 else cubic(np.array(d))
            k = j  # 1-based index, mirrored into 1..n (symmetric padding)
            while k < 1 or k > n:
                k = 1 - k if k < 1 else 2 * n + 1 - k
            total += float(w) * signal[k - 1]
            weight_sum += float(w)
        out[x - 1] = total / weight_sum
    return out


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 1 / 2, 0.7, 2.0, 3.0, 4.0])
def test_imresize_matches_loop_reference(scale: float) -> None:
    image = rng.random((13, 10))
    expected_rows = np.stack([matlab_imresize_1d_reference(col, scale) for col in image.T], axis=1)
    expected = np.stack([matlab_imresize_1d_reference(row, scale) for row in expected_rows])
    np.testing.assert_allclose(imresize(image, scale), expected, rtol=0, atol=1e-12)


def test_imresize_dense_matrix_agrees_and_rows_sum_to_one() -> None:
    image = rng.random((24, 17))
    rows, cols = resize_matrix(24, 8, 1 / 3), resize_matrix(17, 6, 1 / 3)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(imresize(image, 1 / 3), rows @ image @ cols.T, atol=1e-12)


def test_imresize_keeps_constants_channels_and_uint8_class() -> None:
    constant = np.full((12, 9, 3), 0.3)
    np.testing.assert_allclose(imresize(constant, 1 / 3), 0.3, atol=1e-12)
    assert imresize(constant, 2.0).shape == (24, 18, 3)
    colour = rng.random((12, 9, 3))
    np.testing.assert_allclose(imresize(colour, 0.5)[..., 1], imresize(colour[..., 1], 0.5), atol=1e-12)
    as_uint8 = imresize((colour * 255).round().astype(np.uint8), 0.5)
    assert as_uint8.dtype == np.uint8
    assert np.abs(as_uint8.astype(float) - imresize(colour * 255, 0.5)).max() <= 1.0


def test_imresize_antialiasing_differs_from_plain_bicubic_when_shrinking() -> None:
    impulse = np.zeros((40, 40))
    impulse[:, 21] = 1.0  # when shrinking by 4 the kernel spans 16 input pixels, not 4
    spread = np.count_nonzero(np.abs(imresize(impulse, 0.25)[4]) > 1e-12)
    plain = np.count_nonzero(np.abs(imresize(impulse, 0.25, antialiasing=False)[4]) > 1e-12)
    assert (spread, plain) == (4, 1)


def test_rgb2ycbcr_matches_matlab_constants_and_skimage() -> None:
    white, black = np.full((1, 1, 3), 255, np.uint8), np.zeros((1, 1, 3), np.uint8)
    assert rgb2ycbcr(white)[0, 0].tolist() == [235, 128, 128]
    assert rgb2ycbcr(black)[0, 0].tolist() == [16, 128, 128]
    red = np.array([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(rgb2ycbcr(red)[0, 0] * 255, [16 + 65.481, 128 - 37.797, 128 + 112.0])
    image = rng.random((6, 7, 3))
    np.testing.assert_allclose(rgb2ycbcr(image) * 255, skimage_rgb2ycbcr(image), atol=1e-9)
    np.testing.assert_allclose(rgb2y(image), rgb2ycbcr(image)[..., 0], atol=1e-12)
    np.testing.assert_allclose(rgb2ycbcr(image[..., ::-1], channel_order="bgr"), rgb2ycbcr(image))


def test_ycbcr_round_trip_and_uint8_rounding() -> None:
    image = rng.random((5, 4, 3))
    np.testing.assert_allclose(ycbcr2rgb(rgb2ycbcr(image)), image, atol=1e-12)
    pixels = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
    luma = rgb2y(pixels)
    assert luma.dtype == np.uint8
    exact = 16 + pixels.astype(float) @ np.array([65.481, 128.553, 24.966]) / 255
    np.testing.assert_array_equal(luma, np.round(exact))
    with pytest.raises(ValueError, match="channel_order"):
        rgb2ycbcr(image, channel_order="rbg")


def test_grayscale_is_its_own_luma_and_modcrop() -> None:
    gray = rng.integers(0, 256, (11, 7), dtype=np.uint8)
    assert rgb2y(gray) is gray
    assert modcrop(gray, 3).shape == (9, 6)
    assert modcrop(rng.random((11, 7, 3)), 4).shape == (8, 4, 3)


def test_psnr_by_hand_and_border_crop() -> None:
    reference = rng.integers(0, 256, (20, 20)).astype(float)
    image = reference + 1.0  # MSE 1 -> 20 log10(255)
    assert psnr(image, reference, crop_border=2) == pytest.approx(20 * np.log10(255.0))
    image[0, :] += 50  # a bad border row is shaved
    assert psnr(image, reference, crop_border=1) == pytest.approx(20 * np.log10(255.0))
    assert psnr(image, reference, crop_border=0) < 40
    assert psnr(reference, reference, crop_border=0) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        psnr(reference[:-1], reference, crop_border=0)


def test_ssim_matches_scikit_image_gaussian_ssim() -> None:
    reference = rng.integers(0, 256, (40, 37)).astype(float)
    image = np.clip(reference + rng.normal(0, 12, reference.shape), 0, 255)
    expected = structural_similarity(
        image[3:-3, 3:-3], reference[3:-3, 3:-3], data_range=255, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False,
    )
    assert ssim(image, reference, crop_border=3) == pytest.approx(expected, abs=1e-9)
    assert ssim(reference, reference, crop_border=0) == pytest.approx(1.0)


def test_bicubic_on_set5_reproduces_the_vdsr_paper(set5_dir) -> None:
    """VDSR Table 3, bicubic column: 33.66 / 30.39 / 28.42 dB, 0.9299 / 0.8682 / 0.8104."""
    table = summary(evaluate_folder(set5_dir, [2, 3, 4], bicubic_upscaler))
    paper = {"x2": (33.66, 0.9299), "x3": (30.39, 0.8682), "x4": (28.42, 0.8104)}
    for scale, (paper_psnr, paper_ssim) in paper.items():
        assert table[scale]["psnr"] == pytest.approx(paper_psnr, abs=0.01)
        assert table[scale]["ssim"] == pytest.approx(paper_ssim, abs=0.0002)


def test_bicubic_on_b100_reproduces_the_vdsr_paper(tmp_path, shared_datasets) -> None:
    """VDSR Table 3, bicubic column on B100 (the same 100 Berkeley test images): within 0.02 dB."""
    import json
    import shutil

    from conftest import REPO_ROOT

    folder = tmp_path / "B100"
    folder.mkdir()
    for entry in json.loads((REPO_ROOT / "data/manifest.json").read_text())["sets"]["B100"]["files"]:
        shutil.copyfile(shared_datasets / entry["path"], folder / entry["name"])
    table = evaluate_folder(folder, [2, 3, 4], bicubic_upscaler)
    for scale, methods in TABLE3["B100"].items():
        paper_psnr, paper_ssim = methods["bicubic"]
        assert table[scale]["psnr"] == pytest.approx(paper_psnr, abs=0.02), scale
        assert table[scale]["ssim"] == pytest.approx(paper_ssim, abs=0.0005), scale

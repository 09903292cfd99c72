"""vdsr.png: the streaming PNG writer, checked against Pillow's decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vdsr import png
from vdsr.upscale import read_source

from test_upscale import rng_image


def encoded(samples: np.ndarray, band: int | None = None, icc: bytes | None = None) -> bytes:
    """``samples`` as PNG bytes, written ``band`` rows at a time (None: at once)."""
    handle = io.BytesIO()
    if band is None:
        png.write_png(handle, samples, icc=icc)
    else:
        channels = 1 if samples.ndim == 2 else samples.shape[2]
        writer = png.PngWriter(handle, samples.shape[1], samples.shape[0], channels, samples.itemsize * 8, icc=icc)
        for top in range(0, len(samples), band):
            writer.write(samples[top : top + band])
        writer.close()
    return handle.getvalue()


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_round_trip_through_pillow_and_our_reader(tmp_path, channels: int, dtype: type) -> None:
    top = np.iinfo(dtype).max
    shape = (150, 37) if channels == 1 else (150, 37, channels)  # 150 rows: more than one filter chunk
    samples = rng_image(shape, top, seed=channels).astype(dtype)
    path = tmp_path / "out.png"
    path.write_bytes(encoded(samples))
    stored = read_source(path).samples
    np.testing.assert_array_equal(stored, samples.reshape(stored.shape))
    if dtype == np.uint8 or channels == 1:  # Pillow reads 16-bit colour as 8 bits
        np.testing.assert_array_equal(np.asarray(Image.open(path)).astype(int), samples.astype(int))


def test_each_filter_wins_where_it_predicts_best_and_decodes(tmp_path) -> None:
    """Rows built so that None, Sub, Up, Sub, Up, Average and Paeth in turn predict them exactly."""
    rng = np.random.default_rng(0)
    rows = [np.zeros(16, np.int64), np.full(16, 7), np.full(16, 7), np.arange(16) * 9, np.arange(16) * 9 + 3]
    rows.append(rng.integers(0, 256, 16))  # a random row, then one Average predicts from it ...
    average = np.zeros(16, np.int64)
    for i in range(16):
        average[i] = ((average[i - 1] if i else 0) + rows[-1][i]) >> 1
    rows.append(average)
    rows.append(rng.integers(0, 256, 16))  # ... and one Paeth predicts from another random row
    paeth = np.full(16, 5)  # from a first byte that is not the one above, so Up does not follow along
    for i in range(1, 16):
        paeth[i] = png._paeth(np.array(paeth[i - 1]), np.array(rows[-1][i]), np.array(rows[-1][i - 1]))
    rows.append(paeth)
    raw = np.array(rows, np.uint8)
    filtered = png.filter_rows(raw, np.zeros(16, np.uint8), bpp=1)
    assert filtered[:, 0].tolist()[:5] + filtered[[6, 8], 0].tolist() == [0, 1, 2, 1, 2, 3, 4]
    path = tmp_path / "filters.png"
    path.write_bytes(encoded(raw))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), raw)


def test_bands_give_the_same_file_as_one_write() -> None:
    samples = rng_image((211, 45, 3), 255).astype(np.uint8)
    whole = encoded(samples)
    for band in (1, 17, 64, 100):
        assert encoded(samples, band) == whole


def test_size_is_about_pillows() -> None:
    smooth = np.asarray(Image.fromarray(rng_image((40, 40, 3), 255).astype(np.uint8)).resize((400, 400)))
    ours = len(encoded(smooth))
    pillows = io.BytesIO()
    Image.fromarray(smooth).save(pillows, format="PNG")
    assert ours < 1.1 * len(pillows.getvalue())


def test_icc_profile_is_embedded(tmp_path) -> None:
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    path = tmp_path / "icc.png"
    path.write_bytes(encoded(rng_image((9, 7, 3), 255).astype(np.uint8), icc=profile))
    assert Image.open(path).info["icc_profile"] == profile


def test_wrong_rows_are_refused() -> None:
    writer = png.PngWriter(io.BytesIO(), 4, 3, 3, 8)
    with pytest.raises(ValueError, match=r"rows of shape \(n, 4, 3\) uint8 expected, got \(1, 4, 3\) uint16"):
        writer.write(np.zeros((1, 4, 3), np.uint16))
    writer.write(np.zeros((2, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="2 of the picture's 3 rows were written"):
        writer.close()
    with pytest.raises(ValueError, match="more than the 3 rows"):
        writer.write(np.zeros((2, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="5 channels"):
        png.PngWriter(io.BytesIO(), 4, 3, 5, 8)

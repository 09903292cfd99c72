"""``vdsr upscale`` and the model path of ``vdsr evaluate``: colour, bit depth, alpha, tiling, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdsr import inference, upscale
from vdsr.cli import main
from vdsr.color import rgb2ycbcr
from vdsr.evaluate import bicubic_upscaler, evaluate_folder, summary
from vdsr.models import ModelConfig, build_model, save_model
from vdsr.resize import imresize

from conftest import png_header_only


def tiny_model(name: str = "vdsr", depth: int = 3, width: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(name, depth, width)).eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, tiny_model(), ModelConfig("vdsr", 3, 4), {"note": "test"})
    return path


def rng_image(shape: tuple[int, ...], high: int, seed: int = 0) -> np.ndarray:
    """A smooth-ish random image: noise plus a gradient, so bicubic resizing does something."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.2, 0.8, shape[1])[None, :]
    ramp = ramp[..., None] if len(shape) == 3 else ramp
    return np.clip((ramp + 0.15 * rng.standard_normal(shape)) * high, 0, high)


# --- tiling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, depth, width", [("vdsr", 5, 8), ("srcnn", 3, 8)])
@pytest.mark.parametrize("tile", [7, 16, 40])
def test_tiled_inference_equals_whole_image(name: str, depth: int, width: int, tile: int) -> None:
    model = tiny_model(name, depth, width)
    y = np.random.default_rng(1).random((70, 53))
    whole = inference.predict_y(model, y, "cpu", tile=0)
    tiled = inference.predict_y(model, y, "cpu", tile=tile)
    assert whole.shape == tiled.shape == y.shape
    assert np.abs(whole - tiled).max() < 1e-5


def test_receptive_radius_matches_the_models() -> None:
    assert inference.receptive_radius(tiny_model("vdsr", 20, 2)) == 20  # (2d + 1)^2 receptive field
    assert inference.receptive_radius(tiny_model("srcnn", 3, 4)) == 8  # 9-5-5: 17 x 17


def test_overlap_below_receptive_radius_is_rejected() -> None:
    with pytest.raises(ValueError, match="receptive-field radius 5"):
        inference.predict_y(tiny_model("vdsr", 5, 4), np.zeros((20, 20)), "cpu", tile=8, overlap=4)


# --- colour -------------------------------------------------------------------------------------


def test_cbcr_are_bicubic_and_y_comes_from_the_network() -> None:
    rgb = 0.3 + 0.4 * np.random.default_rng(2).random((12, 10, 3))  # mid-range: nothing clips
    out = upscale.upscale_pixels(rgb, 3, lambda y, scale: y + 0.01)
    bicubic = imresize(rgb2ycbcr(rgb), 3.0)
    assert out.shape == (36, 30, 3)
    np.testing.assert_allclose(rgb2ycbcr(out)[..., 1:], bicubic[..., 1:], atol=1e-12)
    np.testing.assert_allclose(rgb2ycbcr(out)[..., 0], bicubic[..., 0] + 0.01, atol=1e-12)


def test_gray_is_its_own_luma() -> None:
    gray = np.random.default_rng(3).random((9, 11))
    out = upscale.upscale_pixels(gray, 2, bicubic_upscaler)
    np.testing.assert_allclose(out, np.clip(imresize(gray, 2.0), 0, 1))


# --- image kinds through the command ------------------------------------------------------------


def write_image(path: Path, kind: str) -> np.ndarray:
    """Write a test image of ``kind``; return its samples as stored."""
    if kind == "rgb":
        data = rng_image((17, 13, 3), 255).astype(np.uint8)
        Image.fromarray(data).save(path)
    elif kind == "gray":
        data = rng_image((17, 13), 255).astype(np.uint8)
        Image.fromarray(data).save(path)
    elif kind == "rgba":
        data = rng_image((17, 13, 4), 255).astype(np.uint8)
        Image.fromarray(data).save(path)
    elif kind == "gray16":
        data = rng_image((17, 13), 65535).astype(np.uint16)
        Image.fromarray(data).save(path)  # Pillow: mode I;16
    elif kind == "rgb16":
        data = rng_image((17, 13, 3), 65535).astype(np.uint16)
        upscale.write_png16(path, data)
    elif kind == "rgba16":
        data = rng_image((17, 13, 4), 65535).astype(np.uint16)
        upscale.write_png16(path, data)
    elif kind == "la16":
        data = rng_image((17, 13, 2), 65535).astype(np.uint16)
        upscale.write_png16(path, data)
    else:
        raise AssertionError(kind)
    return data


@pytest.mark.parametrize("kind", ["rgb16", "rgba16", "la16", "gray16"])
def test_16bit_pngs_round_trip_exactly(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.png"
    data = write_image(path, kind)
    picture = upscale.read_picture(path)
    assert picture.bits == 16
    copy = tmp_path / "copy.png"
    upscale.write_picture(copy, picture)
    again = upscale.read_picture(copy)
    stored = np.dstack([again.pixels] + ([] if again.alpha is None else [again.alpha]))
    np.testing.assert_array_equal(np.round(stored * 65535).astype(np.uint16), data.reshape(stored.shape))


# (kind, expected Pillow mode of the output, channels, bits)
KINDS = [
    ("rgb", "RGB", 3, 8),
    ("gray", "L", 1, 8),
    ("rgba", "RGBA", 4, 8),
    ("gray16", "I;16", 1, 16),
    ("rgb16", "RGB", 3, 16),  # Pillow opens 16-bit colour PNGs as 8-bit RGB; read_picture does not
]


@pytest.mark.parametrize("kind, mode, channels, bits", KINDS)
@pytest.mark.parametrize("scale", [2, 3])
def test_upscale_command_keeps_kind_and_size(
    tmp_path: Path, model_file: Path, kind: str, mode: str, channels: int, bits: int, scale: int
) -> None:
    source = tmp_path / f"{kind}.png"
    write_image(source, kind)
    assert main(["upscale", str(source), "--scale", str(scale), "--model", str(model_file), "--device", "cpu"]) == 0
    out = tmp_path / f"{kind}_x{scale}.png"
    with Image.open(out) as image:
        assert image.size == (13 * scale, 17 * scale)
        assert image.mode == mode
    picture = upscale.read_picture(out)
    assert picture.bits == bits
    assert (picture.pixels.ndim == 3) == (channels >= 3)
    assert (picture.alpha is not None) == (channels == 4)
    if bits == 16:  # full precision: values that 8 bits cannot hold
        assert np.any(np.abs(picture.pixels * 255 - np.round(picture.pixels * 255)) > 0.05)


def test_alpha_is_resized_bicubic(tmp_path: Path, model_file: Path) -> None:
    source = tmp_path / "a.png"
    data = write_image(source, "rgba")
    out = tmp_path / "out"
    assert main(["upscale", str(source), "--scale", "2", "--model", str(model_file), "-o", str(out)]) == 0
    alpha = np.asarray(Image.open(out / "a_x2.png"))[..., 3]
    expected = np.clip(np.round(imresize(data[..., 3] / 255.0, 2.0) * 255), 0, 255)
    np.testing.assert_array_equal(alpha, expected)


def test_tile_option_does_not_change_the_output(tmp_path: Path, model_file: Path) -> None:
    source = tmp_path / "rgb.png"
    write_image(source, "rgb")
    common = [str(source), "--scale", "2", "--model", str(model_file), "--device", "cpu"]
    assert main(["upscale", *common, "-o", str(tmp_path / "whole.png"), "--tile", "0"]) == 0
    assert main(["upscale", *common, "-o", str(tmp_path / "tiled.png"), "--tile", "8", "--overlap", "3"]) == 0
    whole, tiled = (np.asarray(Image.open(tmp_path / name), dtype=int) for name in ("whole.png", "tiled.png"))
    assert np.abs(whole - tiled).max() <= 1  # float32 reassociation may flip a rounding


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"this is not an image\n", b"\x89PNG\r\n\x1a\n truncated"])
def test_unreadable_file_gives_clear_error_and_nonzero_exit(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture, content: bytes
) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    good = tmp_path / "fine.png"
    write_image(good, "gray")
    status = main(["upscale", str(bad), str(good), "--scale", "2", "--model", str(model_file)])
    assert status != 0
    err = capsys.readouterr().err
    assert "broken.png" in err and "not a readable image" in err
    assert (tmp_path / "fine_x2.png").is_file()  # the other images are still done


def test_missing_input_file(tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["upscale", str(tmp_path / "nope.png"), "--scale", "2", "--model", str(model_file)]) != 0
    assert "nope.png: file not found" in capsys.readouterr().err


def test_no_model_and_no_released_weights(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(upscale, "PRETRAINED_MODEL", tmp_path / "pretrained" / "vdsr.pt")
    source = tmp_path / "rgb.png"
    write_image(source, "rgb")
    assert main(["upscale", str(source), "--scale", "2"]) != 0
    err = capsys.readouterr().err
    assert "no released weights" in err and "--model" in err


def test_model_file_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "rgb.png"
    write_image(source, "rgb")
    fake = tmp_path / "fake.pt"
    fake.write_text("nope")
    assert main(["upscale", str(source), "--scale", "2", "--model", str(fake)]) != 0
    assert "fake.pt" in capsys.readouterr().err


# --- vdsr evaluate --model ----------------------------------------------------------------------


def test_evaluate_with_a_model_file(tmp_path: Path, set5_dir: Path) -> None:
    """An identity VDSR (reconstruction layer zeroed) must score exactly bicubic's numbers."""
    model = tiny_model("vdsr", 3, 4)
    with torch.no_grad():
        model.reconstruction.weight.zero_()
        model.reconstruction.bias.zero_()
    path = tmp_path / "identity.pt"
    save_model(path, model, ModelConfig("vdsr", 3, 4), {})
    out = tmp_path / "eval.json"
    args = ["evaluate", "--images", str(set5_dir), "--scales", "2", "--model", str(path), "--device", "cpu"]
    assert main([*args, "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    assert table["Set5"] == summary(evaluate_folder(set5_dir, [2], bicubic_upscaler))
    assert table["Set5"]["x2"]["psnr"] == pytest.approx(33.66, abs=0.005)  # the paper's bicubic


def test_a_single_scale_model_is_refused_at_another_scale(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture
) -> None:
    """A file whose meta records ``provenance.prepare.scales`` (a release: srcnn_x2.pt) runs at those
    scales only; ``vdsr evaluate`` and ``vdsr upscale`` say so naming the file, before any work. A
    file without that record (a stage-trained model) runs at every scale, as before."""
    path = tmp_path / "srcnn_x2.pt"
    save_model(path, tiny_model("srcnn", 3, 4), ModelConfig("srcnn", 3, 4), {"provenance": {"prepare": {"scales": [2]}}})
    message = (f"{path} was trained for x2 only, not x3: use a model trained for x3 ({tmp_path / 'srcnn_x3.pt'}) "
               "or one for all scales")
    y = rng_image((12, 10), 1.0)
    upscaler = inference.load_upscaler(path, "cpu")
    assert upscaler(y, 2).shape == y.shape
    with pytest.raises(ValueError) as refused:
        upscaler(y, 3)
    assert str(refused.value) == message
    with pytest.raises(ValueError, match="not x4"):
        inference.load_upscaler(path, "cpu", scales=[2, 4])  # at load time, for the scales to come
    assert inference.load_upscaler(model_file, "cpu", scales=[3])(y, 3).shape == y.shape  # no record: all scales

    source = tmp_path / "rgb.png"
    write_image(source, "rgb")
    assert main(["upscale", str(source), "--scale", "2", "--model", str(path), "--device", "cpu"]) == 0
    assert (tmp_path / "rgb_x2.png").is_file()
    capsys.readouterr()
    assert main(["upscale", str(source), "--scale", "3", "--model", str(path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"vdsr upscale: error: {message}\n"
    assert not (tmp_path / "rgb_x3.png").exists()
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "rgb.png", "rgb")
    assert main(["evaluate", "--images", str(images), "--scales", "2", "3", "--model", str(path),
                 "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"vdsr evaluate: error: {message}\n"

    from vdsr import serve  # the served model answers the other scale with a 400 naming the file only

    serve_one = serve.file_upscaler(path, "cpu")
    serve_one(source, tmp_path / "served_x2.png", 2, 10**6)
    assert (tmp_path / "served_x2.png").read_bytes() == (tmp_path / "rgb_x2.png").read_bytes()
    with pytest.raises(serve.RequestError) as refused:
        serve_one(source, tmp_path / "served_x3.png", 3, 10**6)
    assert str(refused.value).startswith("srcnn_x2.pt was trained for x2 only, not x3") and str(tmp_path) not in str(refused.value)


def test_16bit_colour_png_with_every_filter_type(tmp_path: Path) -> None:
    """Rows filtered None/Sub/Up/Average/Paeth, as other encoders write them, decode exactly."""
    import struct
    import zlib

    def paeth(a: int, b: int, c: int) -> int:
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        return a if pa <= pb and pa <= pc else (b if pb <= pc else c)

    samples = rng_image((9, 7, 3), 65535).astype(np.uint16)
    rows = samples.astype(">u2").reshape(9, -1).view(np.uint8).astype(int)
    bpp, stream, prior = 6, b"", np.zeros(rows.shape[1], int)
    for y, row in enumerate(rows):
        kind, filtered = y % 5, []
        for i, value in enumerate(row):
            a, b, c = (row[i - bpp] if i >= bpp else 0), prior[i], (prior[i - bpp] if i >= bpp else 0)
            filtered.append((value - [0, a, b, (a + b) // 2, paeth(a, b, c)][kind]) % 256)
        stream += bytes([kind, *filtered])
        prior = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 7, 9, 16, 2, 0, 0, 0)
    path = tmp_path / "filtered.png"
    png = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(stream)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)
    picture = upscale.read_picture(path)
    assert picture.bits == 16
    np.testing.assert_array_equal(np.round(picture.pixels * 65535).astype(np.uint16), samples)


def test_decompression_bomb_is_refused_from_its_header(tmp_path: Path, model_file: Path, capsys) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))  # 10 Gpx declared in 33 bytes
    assert main(["upscale", str(bomb), "--scale", "2", "--model", str(model_file), "-o", str(tmp_path / "out")]) == 2
    assert f"{bomb}: declares 100000x100000 = 10,000,000,000 pixels, over the limit of 16,000,000" in capsys.readouterr().err
    assert not (tmp_path / "out" / "bomb_x2.png").exists()


def test_pixel_limit_is_configurable(tmp_path: Path, model_file: Path, capsys) -> None:
    path = tmp_path / "photo.png"
    Image.fromarray(rng_image((60, 80, 3), 255).astype(np.uint8)).save(path)
    out = tmp_path / "out"
    assert main(["upscale", str(path), "--scale", "2", "--model", str(model_file), "-o", str(out),
                 "--max-pixels", "4000"]) == 2
    assert "declares 80x60 = 4,800 pixels, over the limit of 4,000 (--max-pixels)" in capsys.readouterr().err
    assert main(["upscale", str(path), "--scale", "2", "--model", str(model_file), "-o", str(out),
                 "--max-pixels", "5000"]) == 0
    assert Image.open(out / "photo_x2.png").size == (160, 120)


def test_palette_cmyk_and_one_pixel_images(tmp_path: Path, model_file: Path) -> None:
    rgb = rng_image((20, 24, 3), 255).astype(np.uint8)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(np.array([[[200, 40, 90]]], np.uint8)).save(tmp_path / "dot.png")
    out = tmp_path / "out"
    images = [str(tmp_path / name) for name in ("palette.png", "cmyk.jpg", "dot.png")]
    assert main(["upscale", *images, "--scale", "3", "--model", str(model_file), "-o", str(out)]) == 0
    palette = Image.open(out / "palette_x3.png")
    assert palette.mode == "RGB" and palette.size == (72, 60)
    # The palette's colours are what is upscaled: the chroma is their bicubic chroma.
    colours = np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"), dtype=np.float64) / 255
    expected_chroma = imresize(rgb2ycbcr(colours), 3.0)[..., 1:] * 255
    chroma = rgb2ycbcr(np.asarray(palette))[..., 1:].astype(np.float64)
    assert np.median(np.abs(chroma - expected_chroma)) < 1.5
    cmyk = Image.open(out / "cmyk_x3.png")
    assert cmyk.mode == "RGB" and cmyk.size == (72, 60)
    dot = Image.open(out / "dot_x3.png")
    assert dot.mode == "RGB" and dot.size == (3, 3)

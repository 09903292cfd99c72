"""``vdsr upscale`` band by band: the same output as the whole-image path, memory bounded by the
tile, pictures too large for the memory skipped, progress shown, EXIF orientation, ICC profiles,
multi-frame files, inputs checked before the model loads."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from vdsr import backends, inference, upscale
from vdsr.cli import main
from vdsr.models import ModelConfig, save_model
from vdsr.resize import imresize

from conftest import load_script
from test_upscale import rng_image, tiny_model, write_image

REPO = Path(__file__).resolve().parents[1]
bench = load_script(REPO / "bench" / "upscale_memory.py", "bench_upscale_memory")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, model: torch.nn.Module) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, model, ModelConfig("vdsr", 3, 4), {"note": "test"})
    return path


def stored(path: Path) -> np.ndarray:
    """A PNG's samples as stored (16-bit colour too)."""
    return upscale.read_source(path).samples


def whole_image_output(
    tmp_path: Path, source: Path, scale: int, model: torch.nn.Module, tile: int, overlap: int | None = None,
    variant: backends.Variant | None = None,
) -> np.ndarray:
    """The output of the whole-image path: read_picture, upscale_picture (predict_y on the whole
    luma, in tiles of ``tile``, as ``variant``: default ``vdsr upscale``'s), write_picture."""
    variant = variant or backends.resolve_variant()
    network = backends.upscale_model(model, variant)
    luma = lambda y, _scale: inference.predict_y(network, y, "cpu", tile, overlap,  # noqa: E731
                                                 precision=variant.precision)
    result = upscale.upscale_picture(upscale.read_picture(source), scale, luma)
    path = tmp_path / "whole.png"
    upscale.write_picture(path, result, overwrite=True)
    return stored(path)


# --- the same output ----------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bicubic_rows_are_the_rows_of_imresize_bit_for_bit(channels: int, scale: int) -> None:
    samples = rng_image((23, 17, channels), 255, seed=channels).astype(np.uint8)
    source = upscale.Source(samples, 8)
    whole = imresize(upscale._unit_planes(source, 0, 23), float(scale))
    for r0, r1 in [(0, 1), (0, 7), (5, 30), (23 * scale - 9, 23 * scale), (0, 23 * scale)]:
        np.testing.assert_array_equal(upscale.bicubic_rows(source, scale, r0, r1), whole[r0:r1])


KINDS = ["rgb", "gray", "rgba", "gray16", "rgb16", "rgba16", "la16"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scale, tile, overlap", [(2, 8, None), (3, 7, 5), (4, 0, None), (3, 512, None)])
def test_banded_output_is_the_whole_image_output(
    tmp_path: Path, model: torch.nn.Module, model_file: Path, kind: str, scale: int, tile: int, overlap: int | None
) -> None:
    source = tmp_path / f"{kind}.png"
    write_image(source, kind)
    out = tmp_path / "banded.png"
    options = ["--tile", str(tile)] + ([] if overlap is None else ["--overlap", str(overlap)])
    assert main(["upscale", str(source), "--scale", str(scale), "--model", str(model_file), "--device", "cpu",
                 "-o", str(out), *options]) == 0
    np.testing.assert_array_equal(stored(out), whole_image_output(tmp_path, source, scale, model, tile, overlap))


@pytest.mark.parametrize("variant", [v for v in backends.all_variants() if v.backend.startswith("torch")
                                     and v.backend != "torch-compile"], ids=lambda v: v.name)
def test_banded_output_is_the_same_variants_whole_image_output(
    tmp_path: Path, model: torch.nn.Module, model_file: Path, variant: backends.Variant
) -> None:
    """Each variant, band by band, equals that variant's whole-image output bit for bit (not NCHW's:
    channels_last and bf16 sum in another order); the exact one is evaluation's pass."""
    source = tmp_path / "rgb.png"
    write_image(source, "rgb")
    out = tmp_path / "banded.png"
    assert main(["upscale", str(source), "--scale", "3", "--model", str(model_file), "--device", "cpu",
                 "-o", str(out), "--tile", "7", "--backend", variant.backend, "--precision", variant.precision]) == 0
    np.testing.assert_array_equal(stored(out), whole_image_output(tmp_path, source, 3, model, 7, variant=variant))
    exact = whole_image_output(tmp_path, source, 3, model, 0, variant=backends.REFERENCE)
    if variant == backends.REFERENCE:
        np.testing.assert_array_equal(stored(out), exact)
    else:  # a few uint8 levels at most from the exact output
        assert np.abs(stored(out).astype(int) - exact).max() <= (1 if variant.precision == "fp32" else 4)


def test_a_photo_is_identical_at_the_default_tile(tmp_path: Path, set5_dir: Path, model, model_file) -> None:
    """baby.png, 512 x 512, at x3: 1536 rows in three bands of 512, against the whole image in one pass."""
    source = set5_dir / "baby.png"
    out = tmp_path / "baby_x3.png"
    assert main(["upscale", str(source), "--scale", "3", "--model", str(model_file), "-o", str(out)]) == 0
    np.testing.assert_array_equal(stored(out), whole_image_output(tmp_path, source, 3, model, inference.DEFAULT_TILE))


# --- memory -------------------------------------------------------------------------------------


def measured_upscale(folder: Path, model_file: Path, width: int, height: int, *options: str) -> int:
    """Peak RSS of ``vdsr upscale`` of a ``width`` x ``height`` synthetic RGB picture at x4, in a child."""
    picture = folder / f"p{width}x{height}.png"
    Image.fromarray(rng_image((height, width, 3), 255).astype(np.uint8)).save(picture, compress_level=1)
    out = folder / f"out{width}x{height}{''.join(options)}"
    result = bench.upscale_measured(REPO, picture, model_file, out, 4, list(options), timeout=600)
    assert result.returncode == 0, result.stderr
    return result.peak_rss


@pytest.fixture(scope="module")
def peaks(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> dict[str, int]:
    """Peak RSS of a tiny picture in one window, a square and a 20 times taller one in tiles, and the
    tall one in one window (``--tile 0``)."""
    folder = tmp_path_factory.mktemp("peaks")
    return {
        "tiny whole": measured_upscale(folder, model_file, 8, 8, "--tile", "0"),
        "short": measured_upscale(folder, model_file, 120, 120),
        "tall": measured_upscale(folder, model_file, 120, 2400),
        "tall whole": measured_upscale(folder, model_file, 120, 2400, "--tile", "0"),
        "tall whole exact": measured_upscale(folder, model_file, 120, 2400, "--tile", "0", "--backend", "torch-nchw",
                                             "--precision", "fp32"),
    }


def test_peak_memory_does_not_grow_with_the_picture(peaks: dict[str, int]) -> None:
    """A picture 20 times taller (4.6 Mpx out instead of 0.23) takes no more memory: the band is the
    same. The whole-image path held ~100 bytes per output pixel: +440 MB here."""
    growth = peaks["tall"] - peaks["short"]
    assert growth < 40 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB for 20 times the rows"
    # The measurement sees memory: the same picture in one window of the network takes far more
    # (NCHW fp32's maps: ~400 MiB more; the default's bf16 channels_last ones, ~150).
    assert peaks["tall whole exact"] - peaks["tall"] > 200 * 2**20, peaks
    assert peaks["tall whole"] - peaks["tall"] > 100 * 2**20, peaks


@pytest.mark.parametrize("key, variant", [("tall whole", backends.resolve_variant()),
                                          ("tall whole exact", backends.REFERENCE)], ids=["default", "exact"])
def test_memory_estimate_bounds_the_measured_peak(peaks: dict[str, int], model: torch.nn.Module, key: str,
                                                  variant: backends.Variant) -> None:
    """In one window (memory grows with the picture) the estimate is above what is used, not far
    above: for the default variant (channels_last, bf16 where native) and for the exact NCHW fp32 one.
    The tiny model's 4 channels make its maps light beside the picture's planes, whose estimate has
    the slack (with bf16 the estimate is 2.1x what is used)."""
    network = inference.Network(backends.upscale_model(model, variant), torch.device("cpu"), 0,
                                inference.receptive_radius(model), variant.precision, backend=variant.backend)
    estimate = upscale.memory_needed(upscale.Header(120, 2400, 3, 8), 4, network)
    used = peaks[key] - peaks["tiny whole"]
    assert used < estimate < 2.5 * used, (used, estimate)


def test_too_large_for_the_memory_is_skipped_and_the_batch_goes_on(tmp_path: Path, model_file: Path, capsys) -> None:
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.fromarray(rng_image((200, 200, 3), 255).astype(np.uint8)).save(big)
    write_image(small, "rgb")
    out = tmp_path / "out"
    status = main(["upscale", str(big), str(small), "--scale", "4", "--model", str(model_file), "-o", str(out),
                   "--tile", "0", "--max-memory", "40M"])
    assert status == 2
    err = capsys.readouterr().err
    assert re.search(rf"skipped {re.escape(str(big))}: needs about \d+ MiB for 200x200 at x4 with --tile 0, "
                     r"over the 40 MiB of --max-memory \(a --tile needs less\)", err), err
    assert f"1 of 2 images not written: {big}" in err
    assert not (out / "big_x4.png").exists() and (out / "small_x4.png").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["small_x4.png"]  # no temporary left behind


def test_available_memory_is_what_linux_reports() -> None:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    available = upscale.available_memory()
    assert available is not None and 0 < available <= total


@pytest.mark.parametrize("text, expected", [("2G", 2 * 2**30), ("500M", 500 * 2**20), ("64k", 64 * 2**10),
                                            ("1.5GiB", 3 * 2**29), ("1000", 1000)])
def test_max_memory_sizes(text: str, expected: int) -> None:
    assert upscale.parse_bytes(text) == expected


def test_max_memory_nonsense_is_an_argument_error(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["upscale", "a.png", "--scale", "2", "--max-memory", "lots"])
    assert "expected bytes like 2G, 500M or 1000000, got 'lots'" in capsys.readouterr().err


# --- progress -----------------------------------------------------------------------------------


def test_progress_bars_show_the_time_left_on_a_terminal(tmp_path: Path, model_file: Path) -> None:
    """Through a pseudo-terminal, as a user sees it: a bar per file over its tiles and one for the batch."""
    images = []
    for name in ("first", "second"):
        images.append(tmp_path / f"{name}.png")
        Image.fromarray(rng_image((60, 60, 3), 255).astype(np.uint8)).save(images[-1])
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    child = subprocess.Popen(
        [sys.executable, "-m", "vdsr.cli", "upscale", *map(str, images), "--scale", "2", "--model", str(model_file),
         "--device", "cpu", "-o", str(tmp_path / "out"), "--tile", "16"],
        stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_MININTERVAL": "0"},  # draw every tile
    )
    os.close(follower)
    screen, deadline = b"", time.monotonic() + 300
    while time.monotonic() < deadline:
        if select.select([leader], [], [], 1)[0]:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            screen += data
        elif child.poll() is not None:
            break
    child.wait(timeout=60)
    os.close(leader)
    text = screen.decode(errors="replace")
    assert child.returncode == 0, text
    assert re.search(r"first\.png: +\d+%.*\| *\d+/64 \[\d\d:\d\d<\d\d:\d\d", text), text  # 8 x 8 tiles of 16
    assert re.search(r"second\.png: +\d+%.*\| *\d+/64 \[", text), text
    assert re.search(r"2 images: +\d+%.*\| *\d+/128 \[\d\d:\d\d<\d\d:\d\d", text), text
    assert "first.png (60x60) -> " in text and "second.png (60x60) -> " in text  # log lines go above the bars


def test_no_progress_bars_in_a_log(tmp_path: Path, model_file: Path, capsys) -> None:
    source = tmp_path / "a.png"
    write_image(source, "rgb")
    assert main(["upscale", str(source), str(source.with_name("b.png")), "--scale", "2", "--model",
                 str(model_file), "--tile", "4"]) == 2
    err = capsys.readouterr().err
    assert "b.png: file not found" in err and "tile/s" not in err and "%|" not in err


# --- what the file says about its pixels --------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path: Path, model_file: Path, orientation: int) -> None:
    pixels = rng_image((14, 9, 3), 255).astype(np.uint8)  # not square: turning it shows
    exif = Image.Exif()
    exif[0x0112] = orientation
    tagged, upright = tmp_path / "tagged.jpg", tmp_path / "upright.png"
    Image.fromarray(pixels).save(tagged, exif=exif, quality=95)
    ImageOps.exif_transpose(Image.open(tagged)).save(upright)  # Pillow's reading of the tag
    options = ["--scale", "2", "--model", str(model_file), "-o"]
    assert main(["upscale", str(tagged), *options, str(tmp_path / "a.png")]) == 0
    assert main(["upscale", str(upright), *options, str(tmp_path / "b.png")]) == 0
    turned, straight = (Image.open(tmp_path / name) for name in ("a.png", "b.png"))
    np.testing.assert_array_equal(np.asarray(turned), np.asarray(straight))
    assert 0x0112 not in turned.getexif()


def test_exif_orientation_of_a_16_bit_png(tmp_path: Path) -> None:
    """Pillow cannot turn 16-bit colour; read_source turns the samples themselves."""
    samples = rng_image((5, 3, 3), 65535).astype(np.uint16)
    plain = tmp_path / "plain.png"
    upscale.write_png16(plain, samples)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: upright is a quarter clockwise
    data = plain.read_bytes()
    ihdr_end = 8 + 25
    tagged = tmp_path / "tagged.png"
    from vdsr.png import chunk

    tagged.write_bytes(data[:ihdr_end] + chunk(b"eXIf", exif.tobytes()) + data[ihdr_end:])
    np.testing.assert_array_equal(stored(tagged), np.rot90(samples, -1))


def test_icc_profile_is_carried_over(tmp_path: Path, model_file: Path, caplog) -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgb, gray = tmp_path / "rgb.png", tmp_path / "gray.png"
    Image.fromarray(rng_image((12, 10, 3), 255).astype(np.uint8)).save(rgb, icc_profile=profile)
    Image.fromarray(rng_image((12, 10), 255).astype(np.uint8)).save(gray, icc_profile=profile)  # wrong kind
    assert main(["upscale", str(rgb), str(gray), "--scale", "2", "--model", str(model_file)]) == 0
    assert Image.open(tmp_path / "rgb_x2.png").info["icc_profile"] == profile
    assert "icc_profile" not in Image.open(tmp_path / "gray_x2.png").info
    assert f"{gray}: its ICC profile is for 'RGB', not 'GRAY': the output has none" in caplog.text


@pytest.mark.parametrize("name", ["animated.gif", "pages.tiff", "animated.png"])
def test_several_frames_are_refused_by_name(tmp_path: Path, model_file: Path, capsys, name: str) -> None:
    frames = [Image.fromarray(rng_image((12, 10, 3), 255, seed).astype(np.uint8)) for seed in range(3)]
    multi = tmp_path / name
    frames[0].save(multi, save_all=True, append_images=frames[1:])
    # Refused from the header, before the model (here: none) is loaded.
    assert main(["upscale", str(multi), "--scale", "2", "--model", str(tmp_path / "missing.pt")]) == 2
    err = capsys.readouterr().err
    assert f"{multi}: has 3 frames (an animation or a multi-page file)" in err and "missing.pt" not in err
    good = tmp_path / "good.png"
    write_image(good, "rgb")
    assert main(["upscale", str(multi), str(good), "--scale", "2", "--model", str(model_file)]) == 2
    assert (tmp_path / "good_x2.png").is_file() and not (tmp_path / f"{multi.stem}_x2.png").exists()


def test_inputs_are_checked_before_the_model_loads(tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    args = ["upscale", str(tmp_path / "nope.png"), str(broken), "--scale", "2", "--model", str(tmp_path / "m.pt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "nope.png: file not found" in err and "broken.png: not a readable image" in err
    assert "m.pt" not in err


def test_self_ensemble_upscale_is_the_whole_image_ensemble(tmp_path: Path, model: torch.nn.Module,
                                                          model_file: Path) -> None:
    """vdsr upscale --self-ensemble, band by band in tiles, writes the whole-image self-ensemble."""
    source = tmp_path / "rgb.png"
    write_image(source, "rgb")
    out = tmp_path / "plus.png"
    assert main(["upscale", str(source), "--scale", "3", "--model", str(model_file), "--device", "cpu", "--tile", "8",
                 "--self-ensemble", "-o", str(out)]) == 0
    variant = backends.resolve_variant()  # vdsr upscale's default
    network = backends.upscale_model(model, variant)
    luma = lambda y, _scale: inference.predict_y(network, y, "cpu", 0, precision=variant.precision,  # noqa: E731
                                                 self_ensemble=True)
    whole = upscale.upscale_picture(upscale.read_picture(source), 3, luma)
    upscale.write_picture(tmp_path / "whole.png", whole, overwrite=True)
    np.testing.assert_array_equal(stored(out), stored(tmp_path / "whole.png"))
    plain = tmp_path / "plain.png"
    assert main(["upscale", str(source), "--scale", "3", "--model", str(model_file), "--device", "cpu",
                 "-o", str(plain)]) == 0
    assert not np.array_equal(stored(out), stored(plain))

"""``vdsr upscale`` never writes over an input, never writes two results to one name, keeps existing
outputs unless ``--overwrite``, and decides all that before the model is loaded."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vdsr.cli import build_parser, main
from vdsr.models import ModelConfig, save_model

from test_upscale import rng_image, tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model(path, tiny_model(), ModelConfig("vdsr", 3, 4), {"note": "test"})
    return path


def picture(path: Path, seed: int = 0) -> bytes:
    """Write a small RGB picture at ``path`` (PNG or JPEG by suffix); return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng_image((12, 10, 3), 255, seed).astype(np.uint8)).save(path)
    return path.read_bytes()


def upscale(*args: str | Path) -> int:
    return main(["upscale", *map(str, args), "--scale", "2", "--device", "cpu"])


def test_output_named_as_its_input_is_refused_before_the_model_loads(
    tmp_path: Path, model_file: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "a.png"
    original = picture(source)
    # No model file at all: the refusal must come first.
    assert upscale(source, "-o", source, "--model", tmp_path / "missing.pt") == 2
    err = capsys.readouterr().err
    assert f"the output {source} of {source} is the input {source}" in err and "missing.pt" not in err
    for extra in ([], ["--overwrite"]):
        assert upscale(source, "-o", source, "--model", model_file, *extra) == 2
        assert source.read_bytes() == original


def test_output_that_is_another_input_is_refused(tmp_path: Path, model_file: Path, capsys) -> None:
    first, second = tmp_path / "a.png", tmp_path / "a_x2.png"  # a.png's default output is the second input
    originals = picture(first), picture(second, seed=1)
    assert upscale(first, second, "--model", model_file, "--overwrite") == 2
    assert f"the output {second} of {first} is the input {second}" in capsys.readouterr().err
    assert (first.read_bytes(), second.read_bytes()) == originals
    assert not (tmp_path / "a_x2_x2.png").exists()  # nothing was done, not even the other input


def test_output_through_a_symlinked_folder_is_seen_as_the_input(tmp_path: Path, model_file: Path, capsys) -> None:
    real = tmp_path / "real"
    source = real / "a_x2.png"
    original = picture(source)
    (tmp_path / "link").symlink_to(real)
    assert upscale(real / "a.png", source, "-o", tmp_path / "link", "--model", model_file, "--overwrite") == 2
    assert "is the input" in capsys.readouterr().err
    assert source.read_bytes() == original


def test_hard_link_to_an_input_is_seen_as_the_input(tmp_path: Path, model_file: Path, capsys) -> None:
    source = tmp_path / "in" / "a.png"
    original = picture(source)
    (tmp_path / "out").mkdir()
    os.link(source, tmp_path / "out" / "a_x2.png")
    assert upscale(source, "-o", tmp_path / "out", "--model", model_file, "--overwrite") == 2
    assert "is the input" in capsys.readouterr().err
    assert source.read_bytes() == original


def test_inputs_sharing_a_name_are_refused_before_any_work(tmp_path: Path, model_file: Path, capsys) -> None:
    images = [tmp_path / "a" / "photo.png", tmp_path / "b" / "photo.png", tmp_path / "a" / "photo.jpg"]
    for seed, image in enumerate(images):
        picture(image, seed)
    out = tmp_path / "out"
    assert upscale(*images, "-o", out, "--model", tmp_path / "missing.pt") == 2
    err = capsys.readouterr().err
    assert f"{images[0]}, {images[1]}, {images[2]} would all be written to {out / 'photo_x2.png'}" in err
    assert "missing.pt" not in err
    assert upscale(*images, "-o", out, "--model", model_file) == 2
    assert not out.exists()
    # Without -o the outputs go beside the inputs: a/photo.png and a/photo.jpg still share one.
    assert upscale(images[0], images[2], "--model", model_file) == 2
    assert "would all be written to" in capsys.readouterr().err
    assert not (tmp_path / "a" / "photo_x2.png").exists()
    # The same file named twice is the same mistake.
    assert upscale(images[1], images[1], "--model", model_file) == 2
    assert not (tmp_path / "b" / "photo_x2.png").exists()


def test_existing_output_is_kept_and_the_rest_is_done(tmp_path: Path, model_file: Path, capsys) -> None:
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    picture(first), picture(second, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_x2.png").write_bytes(b"mine")
    assert upscale(first, second, "-o", out, "--model", model_file) == 2
    err = capsys.readouterr().err
    assert f"skipped {first}: {out / 'a_x2.png'} exists, kept (--overwrite replaces it)" in err
    assert f"1 of 2 images not written: {first}" in err
    assert (out / "a_x2.png").read_bytes() == b"mine"
    assert Image.open(out / "b_x2.png").size == (20, 24)
    # Every output there: nothing to do, and the model is not even loaded.
    assert upscale(first, second, "-o", out, "--model", tmp_path / "missing.pt") == 2
    assert "missing.pt" not in capsys.readouterr().err
    # --overwrite replaces it.
    assert upscale(first, "-o", out, "--model", model_file, "--overwrite") == 0
    assert Image.open(out / "a_x2.png").size == (20, 24)


def test_existing_single_output_name_is_kept(tmp_path: Path, model_file: Path, capsys) -> None:
    source, target = tmp_path / "a.png", tmp_path / "mine.png"
    picture(source)
    target.write_bytes(b"mine")
    assert upscale(source, "-o", target, "--model", model_file) == 2
    assert f"{target} exists, kept" in capsys.readouterr().err
    assert target.read_bytes() == b"mine"


def test_output_option_naming_a_file_that_is_not_a_folder(tmp_path: Path, model_file: Path, capsys) -> None:
    source = tmp_path / "a.png"
    picture(source)
    (tmp_path / "out").write_text("a file")
    assert upscale(source, "-o", tmp_path / "out", "--model", tmp_path / "missing.pt") == 2
    assert f"-o {tmp_path / 'out'}: exists and is not a folder" in capsys.readouterr().err


def test_help_says_what_overwrite_does() -> None:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    text = " ".join(subparsers.choices["upscale"].format_help().split())
    assert "--overwrite replace outputs that already exist" in text
    assert "an input is never written over" in text


def test_a_failed_write_keeps_the_old_output_and_leaves_no_temporary(tmp_path: Path, model_file: Path) -> None:
    """A full disk (RLIMIT_FSIZE in the child) while replacing an output with --overwrite."""
    source = tmp_path / "a.png"
    Image.fromarray(rng_image((200, 160, 3), 255).astype(np.uint8)).save(source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_x2.png").write_bytes(b"mine")

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = subprocess.run(
        [sys.executable, "-m", "vdsr.cli", "upscale", str(source), "--scale", "2", "--model", str(model_file),
         "--device", "cpu", "-o", str(out), "--overwrite"],
        cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=small_disk,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2, result.stderr
    assert f"{out / 'a_x2.png'}: File too large" in result.stderr, result.stderr
    assert (out / "a_x2.png").read_bytes() == b"mine"
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.png"]

"""``python -m vdsr.release publish`` is all-or-nothing and knows what it publishes: a SIGKILL at
each file boundary (a real subprocess, paused there by the test-only ``VDSR_RELEASE_PAUSE``) and
one at the instant the weights change leave the old set or the new one whole; the recovery of
every leftover a kill can leave; model kinds; progress of one-pass epochs (``steps_per_epoch: 0``)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from vdsr import atomic_dir, release
from vdsr.checkpoints import Position, load_checkpoint, save_checkpoint
from vdsr.io import sha256_file
from vdsr.models import ModelConfig, build_model, load_model
from vdsr.train import TrainConfig, make_optimizer, train

TINY = ModelConfig("vdsr", depth=3, width=8)
TINY_SRCNN = ModelConfig("srcnn", depth=3, width=4)
RECIPE = TrainConfig(optimizer="adam", lr=1e-3, epochs=3, batch_size=8, steps_per_epoch=4, seed=3)
OTHERS = {"README.md": b"kept by every publish\n"}  # a file of the release folder that is no release's
PAUSE_S = 180  # the longest a publish subprocess may take to reach its next boundary (a loaded 2-core CPU)


def make_checkpoint(path: Path, config: ModelConfig, seed: int, epoch: int = 2, recipe: TrainConfig = RECIPE,
                    extra: dict | None = None) -> Path:
    """A checkpoint of an untrained model (seeded) after ``epoch`` epochs, as vdsr.train writes them."""
    torch.manual_seed(seed)
    model = build_model(config)
    history = [{"epoch": e, "train_loss": 0.1, "lr": 1e-3, "val_psnr_x2": 30.0 + e, "elapsed_s": 10.0 * e}
               for e in range(1, epoch + 1)]
    save_checkpoint(path, model=model, optimizer=make_optimizer(model, recipe, torch.device("cpu")),
                    model_config=config, config=recipe, data_id="d", position=Position(epoch, 0, 0.0, 10.0 * epoch),
                    history=history, extra={"mlflow_runs": [], **(extra or {})})
    return path


@pytest.fixture(scope="module")
def workspace(set5_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose Set5 is one 72x72 crop of bird: an evaluation in a fraction of a second."""
    root = tmp_path_factory.mktemp("ws")
    (root / "data" / "raw" / "Set5").mkdir(parents=True)
    Image.open(set5_dir / "bird.png").crop((100, 100, 172, 172)).save(root / "data" / "raw" / "Set5" / "bird.png")
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())} if folder.is_dir() else {}


def leftovers(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.iterdir() if path.name.startswith(f".{out.name}."))


def shipped_release(tmp_path: Path, workspace: Path) -> tuple[Path, Path, dict[str, bytes]]:
    """A release folder with a VDSR release (untrained weights, seed 1) and another file; the
    checkpoint of different weights (seed 2) to publish over it; the folder's files."""
    out = tmp_path / "pretrained"
    assert release.publish(make_checkpoint(tmp_path / "old.pt", TINY, seed=1), workspace, out, ["Set5"], preset=None)
    for name, data in OTHERS.items():
        (out / name).write_bytes(data)
    return out, make_checkpoint(tmp_path / "new.pt", TINY, seed=2, epoch=3), files_of(out)


def assert_whole_release(files: dict[str, bytes]) -> None:
    """The four files describe the same weights: the card names the model file's sha256, its table
    shows eval.json's scores, and eval.json's are the scores of those weights' training record."""
    card = files[release.CARD_FILE].decode()
    digest = re.search(r"sha256 `([0-9a-f]{64})`", card)[1]
    assert digest == hashlib.sha256(files[release.MODEL_FILE]).hexdigest()
    scores = json.loads(files[release.EVAL_FILE])
    for scale, value in scores["model"]["Set5"].items():
        assert f"| Set5 | {scale} |" in card and f"**{value['psnr']:.2f} / {value['ssim']:.4f}**" in card
    assert files[release.CURVE_FILE][:8] == b"\x89PNG\r\n\x1a\n"


class Publish:
    """``python -m vdsr.release publish`` in a subprocess paused at each boundary (VDSR_RELEASE_PAUSE=1)."""

    def __init__(self, source: Path, workspace: Path, out: Path, portable: bool) -> None:
        env = {**os.environ, release.PAUSE_ENV: "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if portable:
            env[atomic_dir.PORTABLE_ENV] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vdsr.release", "publish", "--from", str(source), "--workspace", str(workspace),
             "--out", str(out), "--sets", "Set5", "--preset", "", "--force"],
            cwd=out.parent, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def next_pause(self) -> str | None:
        """The boundary the process waits at now; None when it has ended."""
        deadline = time.monotonic() + PAUSE_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"no boundary within {PAUSE_S} s; output:\n{''.join(self.output)[-4000:]}")
            if line is None:
                return None
            self.output.append(line)
            if match := re.fullmatch(r"vdsr\.release: paused at (\S+)\n", line):
                return match[1]

    def go_on(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


STAGED = ["copied", release.MODEL_FILE, release.EVAL_FILE, release.CURVE_FILE, release.CARD_FILE, "staged"]


@pytest.mark.parametrize(("portable", "kill_points"), [
    (False, [*STAGED, "swapped"]),  # renameat2(RENAME_EXCHANGE): the folder is whole at every instant
    (True, ["aside", "swapped"]),  # two renames: whole once recover() has run (the staging steps are the same)
], ids=["exchange", "two-renames"])
def test_a_kill_at_each_boundary_leaves_the_old_release_or_the_new_one(
    workspace: Path, tmp_path: Path, portable: bool, kill_points: list[str]
) -> None:
    out, source, old = shipped_release(tmp_path, workspace)
    assert_whole_release(old)
    for kill_at in [*kill_points, None]:  # None: the publish runs to its end
        publish, new, passed = Publish(source, workspace, out, portable), None, []
        try:
            while (point := publish.next_pause()) is not None:
                passed.append(point)
                if point == "staged":  # the new set, complete, before it takes the folder's place
                    new = files_of(atomic_dir.sibling(out, "new"))
                if point == kill_at:
                    publish.kill()
                    break
                publish.go_on()
        finally:
            if publish.process.poll() is None:
                publish.kill()
        if "staged" in passed:  # the new set: the same names, other weights, the other file kept
            assert set(new) == set(old) and new != old and new.items() >= OTHERS.items()
            assert_whole_release(new)
        expected = old if kill_at not in ("swapped", None) else new
        if kill_at is None:
            assert publish.process.returncode == 0, "".join(publish.output)[-3000:]
            assert passed == [*STAGED, *(["aside"] if portable else []), "swapped"]
            assert files_of(out) == new and leftovers(out) == []
            continue
        assert publish.process.returncode == -signal.SIGKILL and passed[-1] == kill_at
        if not (portable and kill_at == "aside"):  # between the two renames there is no folder until recover()
            assert files_of(out) == expected, kill_at
        done = atomic_dir.recover(out)
        assert files_of(out) == expected and leftovers(out) == [], (kill_at, done)
        if kill_at == "swapped":  # the next publish starts from the new release: put the old one back
            with atomic_dir.replacing(out, list(old)) as staging:
                for name, data in old.items():
                    (staging / name).write_bytes(data)
        assert files_of(out) == old


def test_a_kill_when_the_weights_change_leaves_a_whole_release(workspace: Path, tmp_path: Path) -> None:
    """No hook: a real SIGKILL the moment ``pretrained/vdsr.pt`` changes (a tight poll of its inode
    and mtime), where the unsafe publish still had the old eval.json and card for about 0.8 s."""
    out, source, old = shipped_release(tmp_path, workspace)
    model = out / release.MODEL_FILE
    before = (model.stat().st_ino, model.stat().st_mtime_ns)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.Popen(
        [sys.executable, "-m", "vdsr.release", "publish", "--from", str(source), "--workspace", str(workspace),
         "--out", str(out), "--sets", "Set5", "--preset", "", "--force"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            try:
                now = model.stat()
            except FileNotFoundError:
                continue
            if (now.st_ino, now.st_mtime_ns) != before:
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        else:
            raise AssertionError(f"publish ended (exit {process.poll()}) or ran past 300 s without replacing {model}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    files = files_of(out)
    assert set(files) == set(old) and files != old and files.items() >= OTHERS.items()
    assert_whole_release(files)
    assert load_model(model)[2]["training"]["epoch"] == 3  # the new checkpoint's


def test_recover_restores_or_clears_what_each_kill_leaves(tmp_path: Path) -> None:
    target, staging, aside = tmp_path / "pretrained", tmp_path / ".pretrained.new", tmp_path / ".pretrained.old"

    def folder(path: Path, content: bytes) -> None:
        path.mkdir()
        (path / "vdsr.pt").write_bytes(content)

    assert atomic_dir.recover(target) == []  # nothing there, nothing done
    folder(aside, b"old")
    folder(staging, b"new")  # killed between the two renames: the old set comes back
    assert atomic_dir.recover(target) == [f"restored {target} from .pretrained.old", f"removed {staging}"]
    assert files_of(target) == {"vdsr.pt": b"old"} and not staging.exists() and not aside.exists()
    folder(staging, b"partial")  # killed while staging, or after the exchange (then it holds the old set)
    assert atomic_dir.recover(target) == [f"removed {staging}"] and files_of(target) == {"vdsr.pt": b"old"}
    folder(aside, b"older")  # killed after the second rename
    assert atomic_dir.recover(target) == [f"removed {aside}"] and files_of(target) == {"vdsr.pt": b"old"}
    assert atomic_dir.recover(target) == []

    # an error (Ctrl-C included) inside the block: nothing changes, nothing is left
    with pytest.raises(KeyboardInterrupt), atomic_dir.replacing(target, ["vdsr.pt"]) as staged:
        (staged / "vdsr.pt").write_bytes(b"half")
        raise KeyboardInterrupt
    assert files_of(target) == {"vdsr.pt": b"old"} and leftovers(target) == []
    # the same folder twice at once: the second writer is refused
    with atomic_dir.locked(target), pytest.raises(OSError, match="another process is replacing") as refused:
        with atomic_dir.locked(target):
            pass
    assert refused.value.errno == errno.EBUSY and refused.value.filename == str(target)


def test_publish_keeps_each_model_kind_to_its_own_release(workspace: Path, tmp_path: Path, capsys) -> None:
    """An SRCNN checkpoint never becomes vdsr.pt, --force or not: it is its own release beside it."""
    out, _, old = shipped_release(tmp_path, workspace)
    srcnn = make_checkpoint(tmp_path / "srcnn.pt", TINY_SRCNN, seed=4)
    args = ["publish", "--from", str(srcnn), "--workspace", str(workspace), "--out", str(out), "--sets", "Set5",
            "--preset", "", "--force"]
    assert release.main([*args, "--kind", "vdsr"]) == 1
    err = capsys.readouterr().err
    assert f"{srcnn}: a srcnn model" in err and "not a vdsr release's (--force does not change that)" in err
    assert files_of(out) == old

    assert release.publish(srcnn, workspace, out, ["Set5"], force=True, preset=None)  # kind: the checkpoint's
    files = files_of(out)
    assert {name: files[name] for name in old} == old  # VDSR's release untouched
    assert set(files) - set(old) == {"srcnn.pt", "srcnn_eval.json", "srcnn_val_psnr.png", "SRCNN_MODEL_CARD.md"}
    assert load_model(out / "srcnn.pt")[1] == TINY_SRCNN
    card = files["SRCNN_MODEL_CARD.md"].decode()
    assert card.startswith("# SRCNN 9-5-5 (4-2)") and "no residual" in card and "VDSR 3x8" not in card
    assert "(srcnn_val_psnr.png)" in card and "`train.srcnn` as trained" in card
    assert f"sha256 `{sha256_file(out / 'srcnn.pt')}`" in card
    assert json.loads(files["srcnn_eval.json"])["model"]["Set5"]["x2"]["psnr"] > 0

    # a vdsr.pt that holds an SRCNN model (what the old publish wrote) is not compared with
    (out / release.MODEL_FILE).write_bytes(files["srcnn.pt"])
    with pytest.raises(ValueError, match=r"vdsr\.pt: holds a srcnn model, not vdsr"):
        release.publish(tmp_path / "new.pt", workspace, out, ["Set5"], force=True, preset=None)


def test_a_per_scale_release_is_published_and_scored_at_its_scale_only(
    workspace: Path, tmp_path: Path, capsys
) -> None:
    """``--scale 2``: weights from a training on ``prepare.scales: [2]`` become srcnn_x2.* beside the
    other releases, evaluated and held to the targets at x2 only; other scales' data are refused."""
    single = tmp_path / "ws"
    (single / "data").mkdir(parents=True)
    (single / "data" / "raw").symlink_to(workspace / "data" / "raw")
    (single / "params.yaml").write_text("prepare:\n  train_sets: [T91]\n  scales: [2]\n  patch_size: 41\n")
    out, _, old = shipped_release(tmp_path, workspace)
    srcnn = make_checkpoint(tmp_path / "srcnn.pt", TINY_SRCNN, seed=4)
    args = ["publish", "--from", str(srcnn), "--workspace", str(single), "--out", str(out), "--sets", "Set5",
            "--preset", "", "--kind", "srcnn"]
    assert release.main([*args, "--scale", "3"]) == 1  # patches cut at x2 are not an x3 model
    assert "prepare.scales is [2], but a srcnn_x3.pt release needs weights trained on [3]" in capsys.readouterr().err
    assert release.main(args) == 1  # nor a model for every scale
    assert "publish a single-scale training with --scale 2" in capsys.readouterr().err
    assert files_of(out) == old

    assert release.main([*args, "--scale", "2"]) == 0
    files = files_of(out)
    assert {name: files[name] for name in old} == old
    assert set(files) - set(old) == {"srcnn_x2.pt", "srcnn_x2_eval.json", "srcnn_x2_val_psnr.png",
                                     "SRCNN_X2_MODEL_CARD.md"}
    scores = json.loads(files["srcnn_x2_eval.json"])
    assert list(scores["model"]["Set5"]) == ["x2"] and list(scores["bicubic"]["Set5"]) == ["x2"]
    assert scores["weights"] == {"file": "srcnn_x2.pt", "sha256": sha256_file(out / "srcnn_x2.pt")}
    assert load_model(out / "srcnn_x2.pt")[2]["provenance"]["prepare"]["scales"] == [2]
    card = files["SRCNN_X2_MODEL_CARD.md"].decode()
    assert card.startswith("# SRCNN 9-5-5 (4-2) for x2") and "for x2 only" in card
    assert "(36.36)" in card and "32.45" not in card  # its own scale's targets only
    assert "a model for one scale (x2) only" in card and "| Set5 | x3 |" not in card
    # the same weights again do not beat themselves; the x2 release is compared with its own
    assert release.main([*args, "--scale", "2"]) == 0 and files_of(out) == files


def synthetic_run(tmp_path: Path, recipe: TrainConfig, stop_after: int) -> Path:
    """A real training on 20 random 12x12 patches, stopped after ``stop_after`` epochs; its checkpoint."""
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (20, 1, 12, 12), dtype=np.uint8)
    lr = (hr / 255.0 + rng.normal(0, 0.02, hr.shape)).astype(np.float32)
    image = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    validation = {2: [("noise", (image / 255.0).astype(np.float32), image)]}
    path = tmp_path / "last.pt"

    class Stop(Exception):
        pass

    def stop(epoch: int, row: dict) -> None:
        if epoch == stop_after:
            raise Stop

    with pytest.raises(Stop):
        train(lr, hr, validation, TINY, recipe, device="cpu", progress=False, checkpoint_path=path, data_id="d",
              on_epoch_end=stop)
    return path


def test_one_pass_epochs_count_their_steps(workspace: Path, tmp_path: Path) -> None:
    """``steps_per_epoch: 0`` (one pass: floor(20 / 8) = 2 steps): training records the 2, the card
    counts 2 of 6 steps, the warm start continues; a checkpoint without the record counts epochs."""
    recipe = dataclasses.replace(RECIPE, steps_per_epoch=0)
    checkpoint = synthetic_run(tmp_path, recipe, stop_after=1)
    payload = load_checkpoint(checkpoint)
    assert payload["steps_per_epoch"] == 2 and payload["train_config"]["steps_per_epoch"] == 0
    trained = release.read_trained(checkpoint)
    assert (trained.steps_done, trained.total_steps, trained.finished) == (2, 6, False)
    out = tmp_path / "pretrained"
    assert release.publish(checkpoint, workspace, out, ["Set5"], preset=None)
    card = (out / release.CARD_FILE).read_text()
    assert "Status: **in progress: 2 of 6 steps (33%)**" in card and ", 16 patches seen |" in card
    position = release.warm_start(out / release.MODEL_FILE, tmp_path / "warm" / "last.pt")
    assert (position.epoch, position.step) == (1, 0)
    assert load_checkpoint(tmp_path / "warm" / "last.pt")["steps_per_epoch"] == 2  # kept for the next release

    # a checkpoint from before the steps were recorded: progress in epochs, patches not known
    del payload["steps_per_epoch"]
    torch.save(payload, tmp_path / "older.pt")
    assert release.read_trained(tmp_path / "older.pt").progress() == "epoch 1 of 3 (33%)"
    older = tmp_path / "older_release"
    assert release.publish(tmp_path / "older.pt", workspace, older, ["Set5"], preset=None)
    card = (older / release.CARD_FILE).read_text()
    assert "Status: **in progress: epoch 1 of 3 (33%)**" in card and "patches seen not recorded" in card
    assert release.warm_start(older / release.MODEL_FILE, tmp_path / "warm2" / "last.pt").epoch == 1
    # ... and finished only after its last epoch
    payload.update(epoch=3, history=[{**payload["history"][0], "epoch": epoch} for epoch in (1, 2, 3)])
    torch.save(payload, tmp_path / "done.pt")
    done = tmp_path / "done_release"
    assert release.publish(tmp_path / "done.pt", workspace, done, ["Set5"], preset=None)
    assert "Status: **finished**" in (done / release.CARD_FILE).read_text()
    with pytest.raises(ValueError, match=r"a finished training \(epoch 3 of 3 \(100%\)\)"):
        release.warm_start(done / release.MODEL_FILE, tmp_path / "warm3" / "last.pt")

"""The released weights (``pretrained/``): they load with ``weights_only``, ``vdsr evaluate`` uses
them by default and reproduces their model card on Set5; and the release tool itself on a tiny
model: publish only when better, the card, the warm start that continues a release."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT
from vdsr import model_card, release
from vdsr.checkpoints import load_checkpoint
from vdsr.cli import main
from vdsr.evaluate import evaluate_folder, summary
from vdsr.models import ModelConfig, load_model
from vdsr.train import TrainConfig, train
from vdsr.inference import model_upscaler
from vdsr.io import sha256_file

from test_train import prepared_set5_dir, tiny_set5_arrays  # noqa: F401  (fixtures: Set5 patches)

SHIPPED = REPO_ROOT / "pretrained"
TINY = ModelConfig("vdsr", depth=3, width=8)
QUICK = TrainConfig(optimizer="adam", lr=1e-3, lr_schedule="cosine", min_lr=1e-5, warmup_steps=2, loss="l1",
                    clip="norm", clip_theta=1.0, epochs=3, batch_size=8, steps_per_epoch=4, seed=3)


def test_released_weights_reproduce_their_card_on_set5(set5_dir: Path, tmp_path: Path, caplog) -> None:
    """The acceptance of the release: re-evaluated here, on the CPU, to 0.01 dB of the card; without
    ``--model`` the CLI takes the released weights and says so."""
    caplog.set_level("INFO")
    payload = torch.load(SHIPPED / release.MODEL_FILE, map_location="cpu", weights_only=True)
    assert payload["config"] == {"name": "vdsr", "depth": 20, "width": 64}
    assert (SHIPPED / release.MODEL_FILE).stat().st_size < 5_000_000
    shipped = json.loads((SHIPPED / release.EVAL_FILE).read_text())["model"]["Set5"]
    out = tmp_path / "set5.json"
    assert main(["evaluate", "--images", str(set5_dir), "--device", "cpu", "--json", str(out)]) == 0  # no --model
    assert f"the released weights {SHIPPED / release.MODEL_FILE}" in caplog.text
    measured = json.loads(out.read_text())["Set5"]
    card = (SHIPPED / release.CARD_FILE).read_text()
    for scale in ("x2", "x3", "x4"):
        assert measured[scale]["psnr"] == pytest.approx(shipped[scale]["psnr"], abs=0.01), scale
        assert measured[scale]["ssim"] == pytest.approx(shipped[scale]["ssim"], abs=5e-4), scale  # 4 decimals each
        row = re.search(rf"\| Set5 \| {scale} \|.*\*\*([\d.]+) / ([\d.]+)\*\*", card)
        assert row and float(row[1]) == pytest.approx(measured[scale]["psnr"], abs=0.01), (scale, row)
    # the targets the card claims agree with its own table
    shipped_eval = json.loads((SHIPPED / release.EVAL_FILE).read_text())
    table, reached = model_card.results_rows(shipped_eval)
    assert table in card
    if "previous" in shipped_eval:  # a release continued from an earlier one: its own targets
        for text, short in model_card.continuation_targets(shipped_eval, shipped_eval["previous"]["model"]):
            assert f"- {text}: **{'not reached' if short else 'reached'}**" in card, text
    else:
        assert f"every scale: **{'reached' if reached['must'] else 'not reached'}**" in card


@pytest.fixture(scope="module")
def tiny_training(tiny_set5_arrays, tmp_path_factory):  # noqa: F811
    """A tiny cosine run interrupted after 2 of 3 epochs: its checkpoint, and the uninterrupted run."""
    lr, hr, validation = tiny_set5_arrays
    folder = tmp_path_factory.mktemp("tiny")
    whole = train(lr, hr, validation, TINY, QUICK, device="cpu", progress=False,
                  checkpoint_path=folder / "whole.pt", data_id="d")

    class Stop(Exception):
        pass

    def stop_after_2(epoch: int, row: dict) -> None:
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(lr, hr, validation, TINY, QUICK, device="cpu", progress=False, checkpoint_path=folder / "cut.pt",
              data_id="d", checkpoint_extra={"mlflow_run_id": "run-1", "mlflow_runs": ["run-1"]},
              on_epoch_end=stop_after_2)
    return folder, whole


def workspace_with(set5_dir: Path, root: Path) -> Path:
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "Set5").symlink_to(set5_dir)
    return root


def test_publish_writes_a_loadable_release_only_when_better(
    tiny_training, set5_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, _ = tiny_training
    workspace, out = workspace_with(set5_dir, tmp_path / "ws"), tmp_path / "pretrained"
    assert release.publish(folder / "cut.pt", workspace, out, ["Set5"])
    model, config, meta = load_model(out / release.MODEL_FILE)  # weights_only
    assert config == TINY and meta["training"]["epoch"] == 2 and meta["mlflow_run_id"] == "run-1"
    scores = json.loads((out / release.EVAL_FILE).read_text())
    expected = summary(evaluate_folder(set5_dir, [2, 3, 4], model_upscaler(model, torch.device("cpu"))))
    assert scores["model"]["Set5"] == expected
    assert scores["bicubic"]["Set5"]["x2"]["psnr"] == pytest.approx(33.66, abs=0.01)
    card = (out / release.CARD_FILE).read_text()
    assert "in progress: 8 of 12 steps" in card and "| Set5 | x4 |" in card and "Trained from scratch" in card
    assert "SRCNN on Set5, Set14 and B100 at every scale: **not reached**" in card  # B100 is missing
    assert "(Set14, B100, Urban100 not evaluated for this release)" in card
    assert (out / release.CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Set5 decides first: weights that do not beat the release are not evaluated on the other sets.
    (workspace / "data" / "raw" / "Set14").symlink_to(set5_dir)  # a stand-in, quick to evaluate
    before = (out / release.MODEL_FILE).read_bytes()
    caplog.set_level(logging.INFO, logger="vdsr.release")
    assert not release.publish(folder / "cut.pt", workspace, out, ["Set14", "Set5"])  # equal is not better
    assert (out / release.MODEL_FILE).read_bytes() == before
    evaluated = [m[1] for r in caplog.records if (m := re.match(r"release: (\S+) in [\d.]+ s:", r.getMessage()))]
    assert evaluated == ["Set5"] and "does not beat the shipped" in caplog.text
    caplog.clear()
    assert release.publish(folder / "whole.pt", workspace, out, ["Set14", "Set5"], force=True)
    assert load_model(out / release.MODEL_FILE)[2]["training"]["epoch"] == 3
    evaluated = [m[1] for r in caplog.records if (m := re.match(r"release: (\S+) in [\d.]+ s:", r.getMessage()))]
    assert evaluated == ["Set5", "Set14"]
    assert list(json.loads((out / release.EVAL_FILE).read_text())["model"]) == ["Set5", "Set14"]


def test_warm_start_continues_the_release_where_it_stopped(tiny_training, tiny_set5_arrays, tmp_path: Path, set5_dir) -> None:  # noqa: F811
    folder, whole = tiny_training
    out = tmp_path / "pretrained"
    release.publish(folder / "cut.pt", workspace_with(set5_dir, tmp_path / "ws"), out, ["Set5"])
    checkpoint = tmp_path / "checkpoints" / "vdsr" / "last.pt"
    position = release.warm_start(out / release.MODEL_FILE, checkpoint)
    assert (position.epoch, position.step) == (2, 0)
    assert position.elapsed_s == load_checkpoint(folder / "cut.pt")["elapsed_s"] > 0  # the training time goes on
    payload = load_checkpoint(checkpoint)
    assert payload["extra"]["warm_start"]["at"] == "epoch 2" and payload["optimizer"]["state"] == {}
    with pytest.raises(FileExistsError, match="checkpoint exists"):
        release.warm_start(out / release.MODEL_FILE, checkpoint)

    lr, hr, validation = tiny_set5_arrays
    resumed = train(lr, hr, validation, TINY, QUICK, device="cpu", progress=False, checkpoint_path=checkpoint,
                    data_id="d")
    assert resumed.resumed_from == 2 and [row["epoch"] for row in resumed.history] == [1, 2, 3]
    assert resumed.history[:2] == load_checkpoint(folder / "cut.pt")["history"]  # the released epochs, as they were
    assert resumed.history[2]["elapsed_s"] > resumed.history[1]["elapsed_s"] >= resumed.history[0]["elapsed_s"]
    assert resumed.checkpoint_extra["warm_start"]["from"] == release.MODEL_FILE  # kept for the model card
    assert load_checkpoint(checkpoint)["extra"]["warm_starts"][0]["at"] == "epoch 2"
    finished = tmp_path / "finished"
    release.publish(checkpoint, workspace_with(set5_dir, tmp_path / "ws2"), finished, ["Set5"])
    assert "Warm starts" in (finished / release.CARD_FILE).read_text()
    with pytest.raises(ValueError, match="finished training"):
        release.warm_start(finished / release.MODEL_FILE, tmp_path / "other.pt")


def test_warm_start_refuses_other_data(tiny_training, set5_dir: Path, tmp_path: Path) -> None:
    folder, _ = tiny_training
    out = tmp_path / "pretrained"
    release.publish(folder / "cut.pt", workspace_with(set5_dir, tmp_path / "ws"), out, ["Set5"])
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.h5").write_bytes(b"other")
    (prepared / "val.h5").write_bytes(b"data")
    with pytest.raises(ValueError, match="was trained on d; a warm start needs the same prepared data"):
        release.warm_start(out / release.MODEL_FILE, tmp_path / "last.pt", prepared)
    assert not (tmp_path / "last.pt").exists()

    # A new cycle is a new training: it may read other prepared data (larger patches, say). Its
    # checkpoint is for that data, and the chain keeps the data of the cycle it continues.
    release.warm_start(out / release.MODEL_FILE, tmp_path / "last.pt", prepared, new_cycle=QUICK)
    payload = load_checkpoint(tmp_path / "last.pt")
    assert payload["data_id"] == f"{sha256_file(prepared / 'train.h5')}+{sha256_file(prepared / 'val.h5')}"
    assert payload["extra"]["earlier"][-1]["data_id"] == "d"


def test_publish_names_a_file_it_cannot_read(tmp_path: Path, capsys) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert release.main(["publish", "--from", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "out")]) == 1
    assert f"{tmp_path / 'junk.pt'}: not a checkpoint or model file" in capsys.readouterr().err
    assert release.main(["warm-start", "--model", str(tmp_path / "none.pt"), "--to", str(tmp_path / "c.pt")]) == 1
    assert "none.pt: no such checkpoint or model file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "c.pt").exists()


def test_new_cycle_starts_a_new_recipe_from_the_released_weights(tiny_training, tiny_set5_arrays, tmp_path: Path,  # noqa: F811
                                                                  set5_dir: Path) -> None:
    """warm-start --new-cycle: step 0 of another recipe from a finished release's weights, the
    earlier training kept as the chain's first part; the averaged weights are what publish reads."""
    folder, whole = tiny_training
    out = tmp_path / "pretrained"
    release.publish(folder / "whole.pt", workspace_with(set5_dir, tmp_path / "ws"), out, ["Set5"])
    second = TrainConfig(**{**QUICK.__dict__, "lr": 3e-4, "epochs": 2, "ema_decay": 0.5})
    checkpoint = tmp_path / "checkpoints" / "vdsr" / "last.pt"
    position = release.warm_start(out / release.MODEL_FILE, checkpoint, new_cycle=second)
    assert (position.epoch, position.step, position.elapsed_s) == (0, 0, 0.0)
    payload = load_checkpoint(checkpoint)
    assert payload["train_config"]["lr"] == 3e-4 and payload["history"] == []
    (earlier,) = payload["extra"]["earlier"]
    assert earlier["epoch"] == 3 and earlier["history"] == whole.history and earlier["train_config"]["lr"] == 1e-3
    for a, b in zip(payload["model"].values(), whole.model.state_dict().values()):
        assert torch.equal(a, b)  # the released weights, not a random init

    lr, hr, validation = tiny_set5_arrays
    result = train(lr, hr, validation, TINY, second, device="cpu", progress=False, checkpoint_path=checkpoint,
                   data_id="d")
    assert [row["epoch"] for row in result.history] == [1, 2] and "val_psnr_raw_x2" in result.history[0]
    assert result.checkpoint_extra["earlier"][0]["sha256"] == payload["extra"]["warm_start"]["sha256"]
    averaged, raw = release.read_trained(checkpoint), release.read_trained(checkpoint, weights="raw")
    for a, b in zip(averaged.model.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)
    assert raw.extra["weights"] == "raw" and averaged.extra["weights"].startswith("averaged")
    assert not all(torch.equal(a, b) for a, b in zip(averaged.model.state_dict().values(),
                                                      raw.model.state_dict().values()))


def test_publish_of_a_new_cycle_shows_the_chain_the_averaging_and_the_self_ensemble(
        tiny_training, tiny_set5_arrays, tmp_path: Path, set5_dir: Path) -> None:  # noqa: F811
    folder, whole = tiny_training
    first = tmp_path / "first"
    release.publish(folder / "whole.pt", workspace_with(set5_dir, tmp_path / "ws"), first, ["Set5"])
    second = TrainConfig(**{**QUICK.__dict__, "lr": 3e-4, "epochs": 2, "ema_decay": 0.5})
    checkpoint = tmp_path / "last.pt"
    release.warm_start(first / release.MODEL_FILE, checkpoint, new_cycle=second)
    lr, hr, validation = tiny_set5_arrays
    result = train(lr, hr, validation, TINY, second, device="cpu", progress=False, checkpoint_path=checkpoint,
                   data_id="d")
    out = tmp_path / "second"
    assert release.publish(checkpoint, workspace_with(set5_dir, tmp_path / "ws2"), out, ["Set5"], force=True,
                           preset="release-cpu-v2", self_ensemble_sets=["Set5"])
    scores = json.loads((out / release.EVAL_FILE).read_text())
    assert scores["weights"] == {"file": "vdsr.pt", "sha256": release.sha256_file(out / release.MODEL_FILE)}
    plain, plus = scores["model"]["Set5"]["x2"]["psnr"], scores["self_ensemble"]["Set5"]["x2"]["psnr"]
    assert plus != plain
    card = (out / release.CARD_FILE).read_text()
    assert "VDSR+ (x8 self-ensemble)" in card and f"**{plus:.2f} / " in card
    assert "## The chain of trainings" in card and "| 1 | random init | adam 0.001" in card
    assert "| 2 | cycle 1's weights (`vdsr.pt`" in card and "ema 0.5" in card
    assert "## Weight averaging" in card and "averaged minus raw" in card
    last = result.history[-1]
    assert f"| 2 | {last['val_psnr_x2']:.2f} | {last['val_psnr_raw_x2']:.2f} | " in card  # epoch 2: averaged, raw
    assert "make release-cpu-v2" in card and "of the earlier cycles it was warm-started from" in card
    assert (out / release.CURVE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "previous" not in scores and "Targets of the CPU release" in card  # nothing shipped there before
    # published over the release it continues: compared with it, cell by cell (eval.json "previous")
    shutil.copytree(first, tmp_path / "over")
    before = json.loads((first / release.EVAL_FILE).read_text())
    assert release.publish(checkpoint, workspace_with(set5_dir, tmp_path / "ws3"), tmp_path / "over", ["Set5"],
                           force=True, preset="release-cpu-v2")
    over = json.loads((tmp_path / "over" / release.EVAL_FILE).read_text())
    assert over["previous"] == {"weights": before["weights"], "model": before["model"]}
    card = (tmp_path / "over" / release.CARD_FILE).read_text()
    for text, short in model_card.continuation_targets(over, before["model"]):
        assert f"- {text}: **{'not reached' if short else 'reached'}**" in card
    assert "Targets of the CPU release" not in card
    assert "the released weights are the averaged ones" in card
    # --weights raw: the optimizer's weights, not the average, and the card says so
    raw = tmp_path / "raw"
    assert release.main(["publish", "--from", str(checkpoint), "--workspace", str(workspace_with(set5_dir, tmp_path / "ws4")),
                         "--out", str(raw), "--sets", "Set5", "--preset", "release-cpu-v2", "--weights", "raw"]) == 0
    released = load_model(raw / release.MODEL_FILE)[0].state_dict()
    optimizer_weights = load_checkpoint(checkpoint)["model"]
    assert all(torch.equal(released[k], optimizer_weights[k]) for k in released)
    assert not all(torch.equal(released[k], load_model(out / release.MODEL_FILE)[0].state_dict()[k]) for k in released)
    assert "the released weights are the raw ones (`python -m vdsr.release publish --weights raw`)" in (
        raw / release.CARD_FILE).read_text()


def test_score_adds_the_self_ensemble_of_more_sets_to_the_shipped_release(
        tiny_training, set5_dir: Path, tmp_path: Path, capsys) -> None:
    """``python -m vdsr.release score``: the x8 self-ensemble of a set the release lacks is added to eval.json and
    the card (equal to an independent mean of the 8 passes), the weights and curve untouched; a set already scored
    is kept; an eval.json of other weights is refused, nothing changed."""
    folder, _ = tiny_training
    workspace, out = workspace_with(set5_dir, tmp_path / "ws"), tmp_path / "pretrained"
    stand_in = workspace / "data" / "raw" / "Set14"  # two of Set5's images: quick to evaluate 8 times
    stand_in.mkdir()
    for name in ("bird.png", "head.png"):
        (stand_in / name).symlink_to(set5_dir / name)
    assert release.publish(folder / "whole.pt", workspace, out, ["Set5", "Set14"])
    before = {name: (out / name).read_bytes() for name in (release.MODEL_FILE, release.CURVE_FILE)}
    shipped = json.loads((out / release.EVAL_FILE).read_text())
    assert "self_ensemble" not in shipped

    assert release.score(out, workspace, ["Set14"]) == ["Set14"]
    scores = json.loads((out / release.EVAL_FILE).read_text())
    model = load_model(out / release.MODEL_FILE)[0]
    plain = model_upscaler(model, torch.device("cpu"))

    def by_hand(y, scale):  # the 8 symmetries of the square, each mapped back, averaged
        outs = []
        for turns in range(4):
            for flip in (False, True):
                x = np.rot90(np.fliplr(y) if flip else y, turns)
                back = np.rot90(plain(np.ascontiguousarray(x), scale), -turns)
                outs.append(np.fliplr(back) if flip else back)
        return np.mean(outs, axis=0)

    expected = summary(evaluate_folder(stand_in, [2, 3, 4], by_hand))
    for scale, entry in expected.items():
        assert scores["self_ensemble"]["Set14"][scale]["psnr"] == pytest.approx(entry["psnr"], abs=1e-3), scale
        assert scores["self_ensemble"]["Set14"][scale]["ssim"] == pytest.approx(entry["ssim"], abs=1e-3), scale
    assert scores["model"] == shipped["model"] and scores["weights"] == shipped["weights"]
    assert {name: (out / name).read_bytes() for name in before} == before
    card = (out / release.CARD_FILE).read_text()
    assert "scores added by `python -m vdsr.release score`" in card
    assert f"| Set14 | x2 | {scores['model']['Set14']['x2']['psnr']:.2f} / " in card
    assert f"**{scores['self_ensemble']['Set14']['x2']['psnr']:.2f} / " in card
    assert "Not measured on Set5 (8x the evaluation time)" in card

    assert release.score(out, workspace, ["Set14"]) == []  # already there: kept, not evaluated again
    tampered = {**scores, "weights": {"file": "vdsr.pt", "sha256": "0" * 64}}
    (out / release.EVAL_FILE).write_text(json.dumps(tampered))
    card_before = (out / release.CARD_FILE).read_bytes()
    assert release.main(["score", "--self-ensemble", "Set5", "--workspace", str(workspace), "--out", str(out)]) == 1
    assert "publish these weights again" in capsys.readouterr().err
    assert (out / release.CARD_FILE).read_bytes() == card_before
    assert json.loads((out / release.EVAL_FILE).read_text()) == tampered

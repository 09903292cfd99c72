"""The released weights: ``pretrained/vdsr.pt`` with its evaluation and model card, and the warm
start that continues an unfinished release where its checkpoint is gone.

``python -m vdsr.release publish --from CHECKPOINT_OR_MODEL --workspace DIR`` evaluates the weights
with the project's protocol (MATLAB bicubic degradation, Y of BT.601, ``scale`` pixels shaved,
true fp32; :mod:`vdsr.evaluate`) on the test sets and, if they beat the weights already in
``pretrained/`` on Set5 (mean PSNR over the scales) or ``--force`` is given, writes

- ``pretrained/vdsr.pt``: a :func:`vdsr.models.save_model` file (``torch.load(weights_only=True)``)
  whose meta holds the recipe, data hashes, position, history and MLflow runs of the training;
- ``pretrained/eval.json``: ``{set: {"x2": {"psnr", "ssim"}}}`` of it and of bicubic;
- ``pretrained/val_psnr.png``: validation PSNR against training hours;
- ``pretrained/MODEL_CARD.md`` (:mod:`vdsr.model_card`).

The four change together or not at all: they are written into a staging copy of ``pretrained/``
that then takes its place in one step (:mod:`vdsr.atomic_dir`); a publish killed at any instant
leaves the old set or the new one, and the next publish clears what a kill left behind.

A release has one model kind (``ModelConfig.name``), the checkpoint's unless ``--kind`` says; a
checkpoint of another kind is refused, ``--force`` or not. VDSR's files have the names above; an
SRCNN release goes beside them as ``srcnn.pt``, ``srcnn_eval.json``, ``srcnn_val_psnr.png`` and
``SRCNN_MODEL_CARD.md`` (:func:`release_files`), and each kind is compared with its own.

``--scale S`` publishes a single-scale model, the field's convention for SRCNN (Dong et al. train one
model per scale): weights trained on ``prepare.scales: [S]`` only, evaluated at xS only, as
``srcnn_xS.pt``, ``srcnn_xS_eval.json``, ``srcnn_xS_val_psnr.png`` and ``SRCNN_XS_MODEL_CARD.md``,
compared with the release of the same name. A workspace whose patches were cut at other scales is
refused; ``vdsr upscale`` refuses such a model at another scale (:mod:`vdsr.inference`).

``python -m vdsr.release warm-start`` turns ``pretrained/vdsr.pt`` back into a training checkpoint
at the position it was released at (weights, history and elapsed time; the optimizer starts fresh,
the released file holds no optimizer state), so ``make release-cpu`` continues it on a new machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vdsr import atomic_dir, evaluate
from vdsr.checkpoints import (  # Trained, read_trained: re-exported, the release's reading of a training
    Position,
    Trained,
    read_model_file,
    read_trained,
    release_meta,
    save_checkpoint,
    write_model_file,
)
from vdsr.io import error_message, sha256_file, write_json_atomic
from vdsr.models import MODELS
from vdsr.runtime import keep_freed_memory

if TYPE_CHECKING:
    from vdsr.recipe import TrainConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RELEASE_DIR = ROOT / "pretrained"
MODEL_FILE, EVAL_FILE, CURVE_FILE, CARD_FILE = "vdsr.pt", "eval.json", "val_psnr.png", "MODEL_CARD.md"
SETS = ("Set5", "Set14", "B100", "Urban100")
SCALES = (2, 3, 4)
COMPARED_ON = "Set5"  # a release replaces the shipped one when its mean PSNR over SCALES here is higher
PAUSE_ENV = "VDSR_RELEASE_PAUSE"  # tests only: "1" makes publish wait at each file boundary (see _boundary)


@dataclasses.dataclass(frozen=True)
class ReleaseFiles:
    """The four files of one model kind's release, in the release folder (:func:`release_files`)."""

    kind: str  # ModelConfig.name
    scales: tuple[int, ...]  # the scales the release is for and evaluated at: SCALES, or one (per-scale)
    model: str
    eval: str
    curve: str
    card: str

    @property
    def names(self) -> tuple[str, str, str, str]:
        return self.model, self.eval, self.curve, self.card


def release_files(kind: str, scale: int | None = None) -> ReleaseFiles:
    """VDSR's release keeps its names (vdsr.pt, eval.json, val_psnr.png, MODEL_CARD.md); another
    kind's are named after it (srcnn.pt, srcnn_eval.json, srcnn_val_psnr.png, SRCNN_MODEL_CARD.md);
    a single-scale release (``scale``) after the kind and scale (srcnn_x2.pt, srcnn_x2_eval.json,
    srcnn_x2_val_psnr.png, SRCNN_X2_MODEL_CARD.md)."""
    if kind not in MODELS:
        raise ValueError(f"release kind must be one of {', '.join(MODELS)}, got {kind!r}")
    if scale is not None and scale not in SCALES:
        raise ValueError(f"release scale must be one of {', '.join(map(str, SCALES))}, got {scale!r}")
    if kind == "vdsr" and scale is None:
        return ReleaseFiles(kind, SCALES, MODEL_FILE, EVAL_FILE, CURVE_FILE, CARD_FILE)
    name = kind if scale is None else f"{kind}_x{scale}"
    return ReleaseFiles(kind, SCALES if scale is None else (scale,), f"{name}.pt", f"{name}_{EVAL_FILE}",
                        f"{name}_{CURVE_FILE}", f"{name.upper()}_{CARD_FILE}")


def evaluate_sets(model: torch.nn.Module, raw_dir: Path, sets: list[str], scales: list[int], *,
                  self_ensemble: bool = False) -> dict[str, Any]:
    """``{"model": table, "bicubic": table, "seconds": {set: s}}`` (tables as ``metrics/*.json``), true
    fp32; with ``self_ensemble`` ``{"self_ensemble": table, "seconds_self_ensemble": {set: s}}``: the
    x8 self-ensemble of the same weights (:mod:`vdsr.inference`, 8x the time), its own table."""
    from vdsr.inference import model_upscaler
    from vdsr.inference import self_ensemble as ensembled

    upscaler = model_upscaler(model, torch.device("cpu"))
    if self_ensemble:
        upscaler = ensembled(upscaler)
    table, seconds = ("self_ensemble", "seconds_self_ensemble") if self_ensemble else ("model", "seconds")
    result: dict[str, Any] = {table: {}, seconds: {}} if self_ensemble else {"model": {}, "bicubic": {}, "seconds": {}}
    for dataset in sets:
        started = time.perf_counter()
        label = f"release {dataset}{' x8 self-ensemble' if self_ensemble else ''}"
        scores = evaluate.evaluate_folder(raw_dir / dataset, scales, upscaler, progress=label)
        result[seconds][dataset] = round(time.perf_counter() - started, 1)
        result[table][dataset] = evaluate.summary(scores)
        if not self_ensemble:
            result["bicubic"][dataset] = evaluate.summary(evaluate.evaluate_folder(raw_dir / dataset, scales,
                                                                                   evaluate.bicubic_upscaler))
        log.info("release: %s%s in %.0f s: %s", dataset, " (x8 self-ensemble)" if self_ensemble else "",
                 result[seconds][dataset], result[table][dataset])
    return result


def set5_mean(table: dict[str, Any], scales: tuple[int, ...] = SCALES) -> float | None:
    """Mean PSNR over ``scales`` on :data:`COMPARED_ON`; None if the table lacks a scale."""
    scores = table.get(COMPARED_ON, {})
    if not all(f"x{s}" in scores for s in scales):
        return None
    return sum(scores[f"x{s}"]["psnr"] for s in scales) / len(scales)


def check_scales(workspace: Path, files: ReleaseFiles) -> None:
    """A single-scale release needs weights trained on that scale only: ``ValueError`` naming the
    workspace's ``prepare.scales`` otherwise (and for a multi-scale release from a single-scale training)."""
    from vdsr.model_card import prepare_params

    trained_at = prepare_params(workspace).get("scales")
    single = len(files.scales) == 1
    if trained_at is None and not single:
        return  # a workspace without params.yaml: nothing to check a multi-scale release against
    if trained_at is None or (single and list(trained_at) != list(files.scales)) or (not single and len(trained_at) == 1):
        want = f"[{files.scales[0]}]" if single else "several scales"
        raise ValueError(f"{workspace / 'params.yaml'}: prepare.scales is {trained_at}, but a {files.model} release "
                         f"needs weights trained on {want}" + ("" if single else
                         f"; publish a single-scale training with --scale {trained_at[0]}"))


def publish(source: Path, workspace: Path, out_dir: Path, sets: list[str], *, force: bool = False,
            preset: str | None = "release-cpu", kind: str | None = None,
            self_ensemble_sets: list[str] = (), scale: int | None = None, weights: str = "output") -> bool:
    """Evaluate ``source`` and, if it beats ``out_dir``'s release of its kind on Set5 (or ``force``),
    write that release's four files there, all at once (:func:`write_release`). Returns whether it did.

    ``kind``: the release's model kind (default: the checkpoint's); ``ValueError`` if the checkpoint,
    or the model file already released under that kind's name, is of another kind, ``force`` or not.
    ``self_ensemble_sets``: also score the x8 self-ensemble there (eval.json ``self_ensemble``, the
    card's "+" rows); the decision is the plain model's alone. ``scale``: a single-scale release
    (:func:`release_files`), trained on that scale only (:func:`check_scales`), evaluated there only.
    ``weights``: a checkpoint's "output" (the moving average where the recipe keeps one) or "raw"
    (the optimizer's weights; :func:`vdsr.checkpoints.read_trained`), which the card then names.
    """
    trained = read_trained(source, weights)
    kind = kind or trained.config.name
    files = release_files(kind, scale)
    if trained.config.name != kind:
        raise ValueError(f"{source}: a {trained.config.name} model ({trained.config}), not a {kind} release's "
                         f"(--force does not change that); its own release is --kind {trained.config.name}, "
                         f"{out_dir / release_files(trained.config.name).model}")
    check_scales(workspace, files)
    scales = list(files.scales)
    raw_dir = workspace / "data" / "raw"
    log.info("release: %s (%s, %s) on %s", source, trained.config, trained.progress(), ", ".join(sets))
    out_dir = out_dir.resolve()  # a link to the release folder: the folder is what gets replaced
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir.locked(out_dir):
        for done in atomic_dir.recover(out_dir):
            log.info("release: %s, left by an interrupted publish", done)
        old = shipped_score(out_dir, files)
        previous = shipped_record(out_dir, files) if trained.extra.get("earlier") else None
        # The deciding set first, so that weights which do not beat the release cost only its ~20 s (on 2 cores).
        ordered = sorted(sets, key=lambda name: name != COMPARED_ON)
        scores = evaluate_sets(trained.model, raw_dir, ordered[:1], scales)
        new = set5_mean(scores["model"], files.scales)
        if not force and old is not None and (new is None or new <= old):
            log.info("release: Set5 mean %s dB does not beat the shipped %.3f dB; %s left as it is",
                     f"{new:.3f}" if new is not None else "?", old, out_dir / files.model)
            return False
        if ordered[1:]:
            more = evaluate_sets(trained.model, raw_dir, ordered[1:], scales)
            for part, tables in more.items():
                scores[part].update(tables)
        if self_ensemble_sets:
            scores.update(evaluate_sets(trained.model, raw_dir, list(self_ensemble_sets), scales,
                                        self_ensemble=True))
        write_release(out_dir, files, trained, scores, workspace, preset, previous)
    log.info("release: wrote %s in %s (Set5 mean %.3f dB, shipped before: %s)", ", ".join(files.names), out_dir,
             new if new is not None else float("nan"), f"{old:.3f} dB" if old is not None else "none")
    return True


def score(out_dir: Path, workspace: Path, self_ensemble_sets: list[str], *, kind: str = "vdsr",
          scale: int | None = None) -> list[str]:
    """Add the x8 self-ensemble of ``self_ensemble_sets`` to the shipped release of ``kind`` in ``out_dir``,
    the weights unchanged: for each set not scored yet, in turn, its ``self_ensemble`` table is added to
    eval.json and the card is written again from the model file's own record, the two replaced together
    (:func:`vdsr.atomic_dir.replacing`; the model file and curve stay as they are). A set done is kept
    if a later one is interrupted, and the same command goes on from there. Returns the sets scored.

    ``ValueError`` if eval.json's ``weights.sha256`` is not the model file's (its scores would be of
    other weights: publish those again) or the file holds another model kind. ``scale``: the
    single-scale release of :func:`release_files`."""
    files = release_files(kind, scale)
    out_dir = out_dir.resolve()
    model_path, eval_path = out_dir / files.model, out_dir / files.eval
    if not eval_path.is_file():
        raise FileNotFoundError(f"{eval_path}: no {kind} release to score (publish one first)")
    done = []
    for dataset in self_ensemble_sets:
        with atomic_dir.locked(out_dir):
            for left in atomic_dir.recover(out_dir):
                log.info("release: %s, left by an interrupted publish", left)
            # read under the lock, with eval.json: a publish between sets cannot mix two weights' scores
            trained = read_trained(model_path)
            if trained.config.name != kind:
                raise ValueError(f"{model_path}: a {trained.config.name} model, not a {kind} release's")
            shipped = json.loads(eval_path.read_text())
            digest = sha256_file(model_path)
            if shipped.get("weights", {}).get("sha256") != digest:
                raise ValueError(f"{eval_path}: the scores of weights sha256 {shipped.get('weights', {}).get('sha256')}, "
                                 f"not of {model_path} (sha256 {digest}): publish these weights again")
            if dataset in shipped.get("self_ensemble", {}):
                log.info("release: %s x8 self-ensemble already in %s; kept", dataset, eval_path)
                continue
            more = evaluate_sets(trained.model, workspace / "data" / "raw", [dataset], list(files.scales),
                                 self_ensemble=True)
            for part, tables in more.items():
                shipped.setdefault(part, {}).update(tables)
            _write_scores(out_dir, files, trained, shipped)
            done.append(dataset)
        log.info("release: %s x8 self-ensemble added to %s and %s", dataset, eval_path, out_dir / files.card)
    return done


def _write_scores(out_dir: Path, files: ReleaseFiles, trained: Trained, shipped: dict[str, Any]) -> None:
    """Replace ``files``' eval.json (with ``shipped``) and card in ``out_dir`` together, the card drawn
    from the model file's provenance as :func:`write_release` wrote it, plus the date of these scores."""
    from vdsr import model_card
    from vdsr.checkpoints import read_model_meta

    model_path = out_dir / files.model
    provenance = dict(read_model_meta(model_path)["provenance"])
    provenance["scored"] = model_card.now()
    scores = {part: tables for part, tables in shipped.items() if part not in ("weights", "previous")}
    previous = shipped.get("previous")
    with atomic_dir.replacing(out_dir, (files.eval, files.card), on_step=_boundary) as staging:
        write_json_atomic(staging / files.eval, shipped)
        _boundary(files.eval)
        model_card.write_card(staging / files.card, trained, scores, provenance, staging / files.model,
                              shipped["weights"]["sha256"], curve=files.curve, sets=SETS,
                              previous=previous and previous["model"])
        _boundary(files.card)


def shipped_score(out_dir: Path, files: ReleaseFiles) -> float | None:
    """The Set5 mean of the release of ``files.kind`` in ``out_dir`` (None if there is none);
    ``ValueError`` if its model file holds another kind (written before publish checked kinds)."""
    model_path, eval_path = out_dir / files.model, out_dir / files.eval
    if model_path.is_file():
        shipped_kind = read_model_file(model_path)[1].name
        if shipped_kind != files.kind:
            raise ValueError(f"{model_path}: holds a {shipped_kind} model, not {files.kind}, so its scores are "
                             f"not the {files.kind} release's; restore the file from git or remove it (with "
                             f"{', '.join(files.names[1:])}) to publish a {files.kind} release there")
    if not eval_path.is_file():
        return None
    return set5_mean(json.loads(eval_path.read_text())["model"], files.scales)


def shipped_record(out_dir: Path, files: ReleaseFiles) -> dict[str, Any] | None:
    """What the release in ``out_dir`` scored (``{"weights": {...}, "model": table}``, from its eval.json), the
    record a release continued from it is compared with; None if there is none."""
    eval_path = out_dir / files.eval
    if not eval_path.is_file():
        return None
    shipped = json.loads(eval_path.read_text())
    return {"weights": shipped.get("weights") or {"file": files.model, "sha256": sha256_file(out_dir / files.model)},
            "model": shipped["model"]}


def write_release(out_dir: Path, files: ReleaseFiles, trained: Trained, scores: dict[str, Any], workspace: Path,
                  preset: str | None, previous: dict[str, Any] | None = None) -> None:
    """Write the model file, evaluation, curve and card of ``files`` into a staging copy of ``out_dir``
    (its other files kept), then put it in ``out_dir``'s place in one step (:func:`vdsr.atomic_dir.replacing`).
    Call under :func:`vdsr.atomic_dir.locked`, after :func:`vdsr.atomic_dir.recover`. ``previous``: the
    :func:`shipped_record` these weights continue (eval.json ``previous``; the card's targets)."""
    from vdsr import model_card

    provenance = model_card.provenance(workspace, trained, preset, out_dir / files.model)
    with atomic_dir.replacing(out_dir, files.names, on_step=_boundary) as staging:
        model_path = staging / files.model
        write_model_file(model_path, trained.model, trained.config, release_meta(trained, provenance))
        _boundary(files.model)
        weights = {"file": files.model, "sha256": sha256_file(model_path)}  # what the scores are of (vdsr.table3)
        write_json_atomic(staging / files.eval, {"weights": weights, **scores, **({"previous": previous} if previous else {})})
        _boundary(files.eval)
        model_card.write_curve(trained.history, staging / files.curve, trained.extra.get("earlier") or [])
        _boundary(files.curve)
        model_card.write_card(staging / files.card, trained, scores, provenance, model_path, sha256_file(model_path),
                              curve=files.curve, sets=SETS, previous=previous and previous["model"])
        _boundary(files.card)


def _boundary(point: str) -> None:
    """A point of a publish where a kill must leave the release folder whole (after each file, and
    :func:`vdsr.atomic_dir.replacing`'s steps). Tests only: with ``VDSR_RELEASE_PAUSE=1`` the
    process says ``vdsr.release: paused at POINT`` on stderr and waits for a line on stdin, so that
    a test can SIGKILL it exactly there (tests/test_release_atomic.py)."""
    if os.environ.get(PAUSE_ENV) == "1":
        print(f"vdsr.release: paused at {point}", file=sys.stderr, flush=True)
        sys.stdin.readline()


def warm_start(model_path: Path, checkpoint_path: Path, prepared: Path | None = None,
               new_cycle: TrainConfig | None = None) -> Position:
    """Write a training checkpoint at ``checkpoint_path`` from a released model file, with a fresh
    optimizer; refuses to overwrite an existing checkpoint.

    Without ``new_cycle``: at the position the release was published at, to finish its own recipe.
    With ``new_cycle`` (a recipe): at step 0 of that recipe, the released weights instead of a
    random init -- a further training (a second schedule cycle, SGDR-style: Loshchilov & Hutter
    2017) whose checkpoint carries the released training's record as ``extra["earlier"]`` (recipe,
    history, time, MLflow runs), so the next card shows the whole chain.

    ``prepared``: the folder of ``train.h5`` and ``val.h5`` that training will read. Without
    ``new_cycle`` they must be the data the release was trained on (else training would ignore the
    checkpoint and start from scratch). A new cycle may train on other prepared data (larger
    patches, say): its checkpoint is for that data, and the chain records each cycle's
    (``extra["earlier"][i]["data_id"]``).
    """
    from vdsr.train import TrainConfig, make_optimizer

    if checkpoint_path.exists():
        raise FileExistsError(f"{checkpoint_path}: a checkpoint exists already; training resumes from it")
    trained = read_trained(model_path)
    if new_cycle is None and trained.finished:
        raise ValueError(f"{model_path}: a finished training ({trained.progress()}), "
                         "nothing to continue; `make release-cpu` trains the recipe again from scratch, and "
                         "`make release-cpu-v2` trains on from it with a new schedule")
    data_id = trained.data_id
    if prepared is not None:
        here = f"{sha256_file(prepared / 'train.h5')}+{sha256_file(prepared / 'val.h5')}"
        if new_cycle is not None:
            data_id = here
        elif here != trained.data_id:
            raise ValueError(f"{prepared}: train.h5+val.h5 are {here}, but {model_path} was trained on "
                             f"{trained.data_id}; a warm start needs the same prepared data")
    sha256 = sha256_file(model_path)
    if new_cycle is None:
        config = TrainConfig(**{f.name: trained.train_config[f.name] for f in dataclasses.fields(TrainConfig)
                                if f.name in trained.train_config})
        extra = dict(trained.extra)
        extra["warm_start"] = {"from": str(model_path.name), "sha256": sha256, "at": str(trained.position),
                               "optimizer": "fresh"}
        extra["warm_starts"] = [*trained.extra.get("warm_starts", []), extra["warm_start"]]
        history = trained.history
        position = dataclasses.replace(trained.position, loss_sum=0.0)  # the partial epoch's mean loss counts from here
    else:
        config, history, position = new_cycle, [], Position()
        earlier = {"from": str(model_path.name), "sha256": sha256, "train_config": trained.train_config,
                   "epoch": trained.position.epoch, "step": trained.position.step,
                   "elapsed_s": trained.position.elapsed_s, "steps_per_epoch": trained.steps_per_epoch,
                   "data_id": trained.data_id,
                   "history": trained.history, "mlflow_runs": trained.extra.get("mlflow_runs", []),
                   "warm_starts": trained.extra.get("warm_starts", [])}
        extra = {"earlier": [*trained.extra.get("earlier", []), earlier],
                 "warm_start": {"from": str(model_path.name), "sha256": sha256, "at": str(trained.position),
                                "optimizer": "fresh", "new_cycle": True}}
        extra["warm_starts"] = [extra["warm_start"]]
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint_path, model=trained.model, optimizer=make_optimizer(trained.model, config, torch.device("cpu")),
                    model_config=trained.config, config=config, data_id=data_id, position=position,
                    history=history, extra=extra,  # a new cycle's recipe counts its own steps:
                    steps_per_epoch=trained.recorded_steps if new_cycle is None else None)
    log.info("warm start: wrote %s from %s at %s (fresh optimizer%s)", checkpoint_path, model_path, trained.position,
             "; a new cycle of its recipe from step 0" if new_cycle is not None else "")
    return position


def preset_recipe(preset: str, name: str = "vdsr", params_file: Path = Path("params.yaml")) -> TrainConfig:
    """The ``train.<name>`` recipe of ``params_file`` with preset ``preset`` applied, as the stage
    will see it after ``dvc exp run $(python -m vdsr.presets PRESET)``."""
    from vdsr.config import load_params
    from vdsr.presets import load_preset
    from vdsr.recipe import TrainConfig

    section = dict(load_params(params_file)["train"][name])
    prefix = f"train.{name}."
    for key, value in load_preset(preset, params_file=params_file).items():
        if key.startswith(prefix):
            section[key.removeprefix(prefix)] = value
    return TrainConfig(**{f.name: section[f.name] for f in dataclasses.fields(TrainConfig) if f.name in section})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vdsr.release", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pub = commands.add_parser("publish", help="evaluate weights and write them to pretrained/ if they beat it")
    pub.add_argument("--from", dest="source", type=Path, required=True, help="checkpoint or model file")
    pub.add_argument("--workspace", type=Path, default=Path.cwd(), help="the training's DVC workspace")
    pub.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    pub.add_argument("--out", type=Path, default=RELEASE_DIR)
    pub.add_argument("--preset", default="release-cpu", help="the preset the training ran ('' for none)")
    pub.add_argument("--force", action="store_true", help="write even if the shipped release is better")
    pub.add_argument("--self-ensemble", nargs="+", default=[], choices=SETS, metavar="SET",
                     help="also score the x8 self-ensemble (VDSR+) on these sets: 8x their evaluation time "
                          "(Set5 minutes, B100 about 1.5 h on 2 CPU cores)")
    pub.add_argument("--kind", choices=MODELS, help="the release's model kind (default: the checkpoint's; "
                     "vdsr: pretrained/vdsr.pt, srcnn: pretrained/srcnn.pt); another kind is refused")
    pub.add_argument("--weights", choices=("output", "raw"), default="output",
                     help="a checkpoint's weights to release: output (the moving average where the recipe keeps "
                          "one, ema_decay > 0) or raw (the optimizer's; the card's averaging table shows both)")
    pub.add_argument("--scale", type=int, choices=SCALES, help="a single-scale release (srcnn_x2.pt, ...): weights "
                     "trained on prepare.scales [SCALE] only, evaluated at that scale only")
    scoring = commands.add_parser("score", help="add the x8 self-ensemble of more sets to the shipped release "
                                  "(weights unchanged; eval.json and the card rewritten together)")
    scoring.add_argument("--self-ensemble", nargs="+", required=True, choices=SETS, metavar="SET",
                         help="sets to score as VDSR+ (x8 self-ensemble), each added as it is done: 8x their "
                              "evaluation time (Set14 about 20 min, B100 about 1.5 h on 2 CPU cores)")
    scoring.add_argument("--kind", choices=MODELS, default="vdsr", help="the release scored (default: vdsr)")
    scoring.add_argument("--scale", type=int, choices=SCALES, help="the single-scale release scored (srcnn_x2.pt, ...)")
    scoring.add_argument("--workspace", type=Path, default=Path.cwd(), help="where data/raw holds the test sets")
    scoring.add_argument("--out", type=Path, default=RELEASE_DIR)
    warm = commands.add_parser("warm-start", help="a training checkpoint from the released weights")
    warm.add_argument("--model", type=Path, default=RELEASE_DIR / MODEL_FILE)
    warm.add_argument("--to", type=Path, default=Path("checkpoints/vdsr/last.pt"))
    warm.add_argument("--data", type=Path, help="folder of train.h5 and val.h5: checked against the release's, or with "
                      "--new-cycle the data the new cycle trains on (recorded in its chain)")
    warm.add_argument("--new-cycle", metavar="PRESET",
                      help="start this preset's recipe (params.yaml + presets/PRESET.yaml) from step 0 with the "
                           "released weights, instead of finishing the release's own recipe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    keep_freed_memory()  # evaluation: a third less time per whole-image pass
    try:
        if args.command == "publish":
            publish(args.source, args.workspace, args.out, args.sets, force=args.force, preset=args.preset or None,
                    kind=args.kind, self_ensemble_sets=args.self_ensemble, scale=args.scale,
                    weights=args.weights)
        elif args.command == "score":
            score(args.out, args.workspace, args.self_ensemble, kind=args.kind, scale=args.scale)
        else:
            warm_start(args.model, args.to, args.data,
                       preset_recipe(args.new_cycle) if args.new_cycle else None)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        print(f"vdsr.release: error: {error_message(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

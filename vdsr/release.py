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

``python -m vdsr.release warm-start`` turns ``pretrained/vdsr.pt`` back into a training checkpoint
at the position it was released at (weights, history and elapsed time; the optimizer starts fresh,
the released file holds no optimizer state), so ``make release-cpu`` continues it on a new machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vdsr import evaluate
from vdsr.checkpoints import CHECKPOINT_FORMAT, Position, history_of, position_of, save_checkpoint
from vdsr.io import error_message, sha256_file, write_json_atomic
from vdsr.models import ModelConfig, build_model, load_model, save_model

if TYPE_CHECKING:
    from vdsr.train import TrainConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
RELEASE_DIR = ROOT / "pretrained"
MODEL_FILE, EVAL_FILE, CURVE_FILE, CARD_FILE = "vdsr.pt", "eval.json", "val_psnr.png", "MODEL_CARD.md"
SETS = ("Set5", "Set14", "B100", "Urban100")
SCALES = (2, 3, 4)
COMPARED_ON = "Set5"  # a release replaces the shipped one when its mean PSNR over SCALES here is higher


@dataclasses.dataclass
class Trained:
    """Weights and how they were trained, from a checkpoint or a model file."""

    model: torch.nn.Module
    config: ModelConfig
    train_config: dict[str, Any]  # vdsr.train.TrainConfig as a dict (the params.yaml section)
    position: Position
    history: list[dict[str, float]]
    data_id: str  # "<train.h5 sha256>+<val.h5 sha256>"
    extra: dict[str, Any]  # mlflow_runs, warm_start, ...

    @property
    def total_steps(self) -> int:
        return int(self.train_config["epochs"]) * int(self.train_config["steps_per_epoch"])

    @property
    def steps_done(self) -> int:
        return self.position.epoch * int(self.train_config["steps_per_epoch"]) + self.position.step


def read_trained(path: Path, weights: str = "output") -> Trained:
    """A training checkpoint (``checkpoints/<name>/last.pt``) or a model file (``models/<name>.pt``,
    a release); ``ValueError`` naming the file if it is neither or lacks the training record.

    ``weights`` of a checkpoint: "output" (the run's output: the averaged weights when the recipe
    keeps a moving average, ``ema_decay > 0``; else the weights), "raw" (the optimizer's weights).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors alike
        raise ValueError(f"{path}: not a checkpoint or model file ({type(error).__name__}: {error})") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        config = ModelConfig(**payload["model_config"])
        model = build_model(config)
        averaged = payload.get("ema") if weights == "output" else None
        model.load_state_dict(averaged["state"] if averaged else payload["model"])
        extra = dict(payload["extra"])
        extra["weights"] = "averaged (ema_decay " + str(payload["train_config"].get("ema_decay")) + ")" if averaged else "raw"
        extra.setdefault("mlflow_runs", [extra["mlflow_run_id"]] if extra.get("mlflow_run_id") else [])
        return Trained(model.eval(), config, dict(payload["train_config"]), position_of(payload),
                       history_of(payload), payload["data_id"], extra)
    model, config, meta = load_model(path)
    record = meta.get("training") or _from_stage_meta(meta)
    if record is None:
        raise ValueError(f"{path}: a model file without its training record (meta 'training' or 'history')")
    position = Position(int(record["epoch"]), int(record["step"]), 0.0, float(record["elapsed_s"]))
    return Trained(model, config, dict(record["train_config"]), position, list(record["history"]),
                   record["data_id"], dict(record["extra"]))


def _from_stage_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The training record of a model file written by ``stages/train.py`` (a finished training)."""
    if "history" not in meta or not meta["history"]:
        return None
    last = meta["history"][-1]
    return {"epoch": int(last["epoch"]), "step": 0, "elapsed_s": float(last.get("elapsed_s", 0.0)),
            "train_config": meta["params"], "history": meta["history"],
            "data_id": f"{meta['train_data_sha256']}+{meta['val_data_sha256']}",
            "extra": {"mlflow_runs": meta.get("mlflow_runs", []), "warm_start": meta.get("warm_start")}}


def training_record(trained: Trained) -> dict[str, Any]:
    """Plain data for the model file's meta: what :func:`read_trained` and the warm start need."""
    return {"epoch": trained.position.epoch, "step": trained.position.step,
            "elapsed_s": trained.position.elapsed_s, "train_config": trained.train_config,
            "history": trained.history, "data_id": trained.data_id, "extra": trained.extra}


def evaluate_sets(model: torch.nn.Module, raw_dir: Path, sets: list[str], scales: list[int]) -> dict[str, Any]:
    """``{"model": table, "bicubic": table, "seconds": {set: s}}`` (tables as ``metrics/*.json``), true fp32."""
    from vdsr.upscale import model_upscaler

    upscaler = model_upscaler(model, torch.device("cpu"))
    result: dict[str, Any] = {"model": {}, "bicubic": {}, "seconds": {}}
    for dataset in sets:
        started = time.perf_counter()
        scores = evaluate.evaluate_folder(raw_dir / dataset, scales, upscaler, progress=f"release {dataset}")
        result["seconds"][dataset] = round(time.perf_counter() - started, 1)
        result["model"][dataset] = evaluate.summary(scores)
        bicubic = evaluate.evaluate_folder(raw_dir / dataset, scales, evaluate.bicubic_upscaler)
        result["bicubic"][dataset] = evaluate.summary(bicubic)
        log.info("release: %s in %.0f s: %s", dataset, result["seconds"][dataset], result["model"][dataset])
    return result


def set5_mean(table: dict[str, Any]) -> float | None:
    """Mean PSNR over :data:`SCALES` on :data:`COMPARED_ON`; None if the table lacks a scale."""
    scores = table.get(COMPARED_ON, {})
    if not all(f"x{s}" in scores for s in SCALES):
        return None
    return sum(scores[f"x{s}"]["psnr"] for s in SCALES) / len(SCALES)


def publish(source: Path, workspace: Path, out_dir: Path, sets: list[str], *, force: bool = False,
            preset: str | None = "release-cpu") -> bool:
    """Evaluate ``source`` and, if it beats ``out_dir``'s release on Set5 (or ``force``), write the
    release files there (each atomically; the model card last). Returns whether it did."""
    from vdsr import model_card

    trained = read_trained(source)
    raw_dir = workspace / "data" / "raw"
    log.info("release: %s (%s, %d of %d steps) on %s", source, trained.config, trained.steps_done,
             trained.total_steps, ", ".join(sets))
    old = None
    if (out_dir / EVAL_FILE).is_file():
        import json

        old = set5_mean(json.loads((out_dir / EVAL_FILE).read_text())["model"])
    # The deciding set first, so that weights which do not beat the release cost only its ~20 s (on 2 cores).
    ordered = sorted(sets, key=lambda name: name != COMPARED_ON)
    scores = evaluate_sets(trained.model, raw_dir, ordered[:1], list(SCALES))
    new = set5_mean(scores["model"])
    if not force and old is not None and (new is None or new <= old):
        log.info("release: Set5 mean %s dB does not beat the shipped %.3f dB; %s left as it is",
                 f"{new:.3f}" if new is not None else "?", old, out_dir)
        return False
    if ordered[1:]:
        more = evaluate_sets(trained.model, raw_dir, ordered[1:], list(SCALES))
        for part, tables in more.items():
            scores[part].update(tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    provenance = model_card.provenance(workspace, trained, preset, model_path)
    last_run = next(reversed(provenance["runs"].items()), (None, {}))
    save_model(model_path, trained.model, trained.config,
               {"training": training_record(trained), "provenance": provenance, "params": trained.train_config,
                "epochs": trained.position.epoch, "mlflow_run_id": last_run[0],
                "git_commit": last_run[1].get("git.commit")})  # the last two as stages/train.py writes them
    write_json_atomic(out_dir / EVAL_FILE, scores)
    model_card.write_curve(trained.history, out_dir / CURVE_FILE)
    model_card.write_card(out_dir / CARD_FILE, trained, scores, provenance, model_path, sha256_file(model_path))
    log.info("release: wrote %s, %s, %s and %s (Set5 mean %.3f dB, shipped before: %s)", model_path,
             out_dir / EVAL_FILE, out_dir / CURVE_FILE, out_dir / CARD_FILE, new if new is not None else float("nan"),
             f"{old:.3f} dB" if old is not None else "none")
    return True


def warm_start(model_path: Path, checkpoint_path: Path, prepared: Path | None = None,
               new_cycle: TrainConfig | None = None) -> Position:
    """Write a training checkpoint at ``checkpoint_path`` from a released model file, with a fresh
    optimizer; refuses to overwrite an existing checkpoint.

    Without ``new_cycle``: at the position the release was published at, to finish its own recipe.
    With ``new_cycle`` (a recipe): at step 0 of that recipe, the released weights instead of a
    random init -- a further training (a second schedule cycle, SGDR-style: Loshchilov & Hutter
    2017) whose checkpoint carries the released training's record as ``extra["earlier"]`` (recipe,
    history, time, MLflow runs), so the next card shows the whole chain.

    ``prepared``: the folder of ``train.h5`` and ``val.h5``; when given, they must be the data the
    release was trained on (else training would ignore the checkpoint and start from scratch).
    """
    from vdsr.train import TrainConfig, make_optimizer

    if checkpoint_path.exists():
        raise FileExistsError(f"{checkpoint_path}: a checkpoint exists already; training resumes from it")
    trained = read_trained(model_path)
    if new_cycle is None and trained.steps_done >= trained.total_steps:
        raise ValueError(f"{model_path}: a finished training ({trained.steps_done} of {trained.total_steps} steps), "
                         "nothing to continue; `make release-cpu` trains the recipe again from scratch, and "
                         "`make release-cpu-v2` trains on from it with a new schedule")
    if prepared is not None:
        here = f"{sha256_file(prepared / 'train.h5')}+{sha256_file(prepared / 'val.h5')}"
        if here != trained.data_id:
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
                   "elapsed_s": trained.position.elapsed_s, "history": trained.history,
                   "mlflow_runs": trained.extra.get("mlflow_runs", []),
                   "warm_starts": trained.extra.get("warm_starts", [])}
        extra = {"earlier": [*trained.extra.get("earlier", []), earlier],
                 "warm_start": {"from": str(model_path.name), "sha256": sha256, "at": str(trained.position),
                                "optimizer": "fresh", "new_cycle": True}}
        extra["warm_starts"] = [extra["warm_start"]]
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint_path, model=trained.model, optimizer=make_optimizer(trained.model, config, torch.device("cpu")),
                    model_config=trained.config, config=config, data_id=trained.data_id, position=position,
                    history=history, extra=extra)
    log.info("warm start: wrote %s from %s at %s (fresh optimizer%s)", checkpoint_path, model_path, trained.position,
             "; a new cycle of its recipe from step 0" if new_cycle is not None else "")
    return position


def preset_recipe(preset: str, name: str = "vdsr", params_file: Path = Path("params.yaml")) -> TrainConfig:
    """The ``train.<name>`` recipe of ``params_file`` with preset ``preset`` applied, as the stage
    will see it after ``dvc exp run $(python -m vdsr.presets PRESET)``."""
    from vdsr.config import load_params
    from vdsr.presets import load_preset
    from vdsr.train import TrainConfig

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
    warm = commands.add_parser("warm-start", help="a training checkpoint from the released weights")
    warm.add_argument("--model", type=Path, default=RELEASE_DIR / MODEL_FILE)
    warm.add_argument("--to", type=Path, default=Path("checkpoints/vdsr/last.pt"))
    warm.add_argument("--data", type=Path, help="folder of train.h5 and val.h5 to check against the release's")
    warm.add_argument("--new-cycle", metavar="PRESET",
                      help="start this preset's recipe (params.yaml + presets/PRESET.yaml) from step 0 with the "
                           "released weights, instead of finishing the release's own recipe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "publish":
            publish(args.source, args.workspace, args.out, args.sets, force=args.force, preset=args.preset or None)
        else:
            warm_start(args.model, args.to, args.data,
                       preset_recipe(args.new_cycle) if args.new_cycle else None)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        print(f"vdsr.release: error: {error_message(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

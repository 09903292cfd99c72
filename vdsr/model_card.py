"""The model card of a release (``pretrained/MODEL_CARD.md``; an SRCNN release's
``pretrained/SRCNN_MODEL_CARD.md``), its validation curve and provenance.

The card's table compares with the paper's Table 3 (:data:`vdsr.paper.TABLE3`, 291 training
images) and states which targets of the CPU release are reached: above the paper's SRCNN on
Set5, Set14 and B100 at every scale (must), the paper's 91-image VDSR on Set5 (goal, Figure/Table
of the paper: 37.06 / 33.27 / 30.95), the paper's VDSR on Set5 (moonshot).
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vdsr import paper
from vdsr.io import write_text_atomic

if TYPE_CHECKING:
    from vdsr.checkpoints import Trained
    from vdsr.models import ModelConfig

VDSR_91 = {"x2": 37.06, "x3": 33.27, "x4": 30.95}  # the paper's VDSR trained on 91 images, Set5
MUST_SETS = ("Set5", "Set14", "B100")
SRCNN_MUST_DB = 0.3  # an SRCNN release's must: Set5 within this of the paper's SRCNN at every scale
RECIPE_NOTES = Path(__file__).resolve().parents[1] / "presets"  # <preset>.md: how the recipe was chosen


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(workspace: Path, trained: Trained, preset: str | None, shipped: Path) -> dict[str, Any]:
    """Where the weights come from: preset, data hashes (dvc.lock), each MLflow run of the training
    (times, commit, device; from the workspace's store, :func:`vdsr.tracking.run_summaries`, or from
    the shipped release for runs made on another machine: ``shipped``, the release file being
    replaced), and the machine that published them."""
    from vdsr.provenance import data_hashes
    from vdsr.tracking import run_summaries

    ids = list(trained.extra.get("mlflow_runs", []))
    here, earlier = run_summaries(workspace, ids), {}
    if shipped.is_file():  # runs of earlier sessions, on machines whose store is gone
        from vdsr.checkpoints import read_model_meta

        earlier = read_model_meta(shipped).get("provenance", {}).get("runs", {})
    runs = {run_id: here.get(run_id) or earlier.get(run_id) or {} for run_id in ids}
    return {
        "preset": preset,
        "data": data_hashes(workspace),
        "data_id": trained.data_id,
        "runs": runs,
        "published": now(),
        "machine": f"{_cpu_model()}, {platform.machine()}, {os.cpu_count()} cores",
        "prepare": prepare_params(workspace),
    }


def now() -> str:
    """The time as a card gives it: UTC to the minute."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def prepare_params(workspace: Path) -> dict[str, Any]:
    """The workspace's ``prepare`` params (training sets, scales): what the patches were cut from."""
    try:
        return dict(yaml.safe_load((workspace / "params.yaml").read_text())["prepare"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return {}


def write_curve(history: list[dict[str, float]], path: Path, earlier: list[dict[str, Any]] = ()) -> None:
    """Validation PSNR (Set5, dB) of each scale against training hours, as PNG (matplotlib, Agg).

    ``earlier``: the trainings this one continues (a checkpoint's ``extra["earlier"]``, oldest first),
    drawn before it on one time axis, each new cycle marked by a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    cycles = [*(list(part["history"]) for part in earlier), history]
    offsets = [0.0]
    for part in earlier:
        offsets.append(offsets[-1] + float(part.get("elapsed_s", 0.0)) / 3600)
    keys = sorted({k for rows in cycles for row in rows[:1] for k in row if k.startswith("val_psnr_x")})
    for key in keys:
        scale = key.removeprefix("val_psnr_")
        hours = [offset + row.get("elapsed_s", 0.0) / 3600 for offset, rows in zip(offsets, cycles) for row in rows]
        values = [row.get(key, float("nan")) for rows in cycles for row in rows]
        axes.plot(hours, values, marker="o", markersize=3, label=f"{scale} (ours)")
        srcnn = paper.TABLE3["Set5"][scale]["srcnn"][0]
        axes.axhline(srcnn, linestyle=":", linewidth=1, color=axes.lines[-1].get_color())
    for number, offset in enumerate(offsets[1:], start=2):
        axes.axvline(offset, linestyle="--", linewidth=1, color="gray")
        axes.annotate(f"cycle {number}", (offset, 0.02), xycoords=("data", "axes fraction"), fontsize=8,
                      xytext=(3, 0), textcoords="offset points")
    axes.set_xlabel("training time (hours, this CPU)")
    axes.set_ylabel("Set5 validation PSNR (dB)")
    axes.set_title("Validation PSNR after each epoch; dotted: the paper's SRCNN")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    figure.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)


def plus_rows(scores: dict[str, Any], kind: str) -> str:
    """The x8 self-ensemble's own table ("VDSR+"), beside the plain model and the paper; empty if unmeasured."""
    plus = scores.get("self_ensemble") or {}
    if not plus:
        return ""
    name = f"{kind.upper()}+ (x8 self-ensemble)"
    lines = [f"| set | scale | this model, plain | **{name}** | gain | {kind.upper()} (paper) | vs paper |",
             "|---|---|---|---|---|---|---|"]
    for dataset, by_scale in plus.items():
        for scale, ours in by_scale.items():
            plain = scores["model"].get(dataset, {}).get(scale)
            ref = paper.TABLE3[dataset][scale][kind]
            lines.append(f"| {dataset} | {scale} | {_score(plain)} | **{_score(ours)}** | "
                         f"{ours['psnr'] - plain['psnr'] if plain else float('nan'):+.2f} | "
                         f"{ref[0]:.2f} / {ref[1]:.4f} | {ours['psnr'] - ref[0]:+.2f} |")
    skipped = [name for name in scores["model"] if name not in plus]
    note = f" Not measured on {', '.join(skipped)} (8x the evaluation time)." if skipped else ""
    return (f"\n\n{name}: the same weights averaged over the 8 flips/rotations of each image at inference "
            f"(`vdsr evaluate --self-ensemble`; 8x the time), reported on its own.{note}\n\n" + "\n".join(lines))


def _score(entry: dict[str, float] | None) -> str:
    return f"{entry['psnr']:.2f} / {entry['ssim']:.4f}" if entry else "-"


def chain_text(trained: Trained, prov: dict[str, Any]) -> str:
    """The trainings these weights went through, oldest first: each cycle's recipe, steps, hours, last
    validation and MLflow runs (a checkpoint's ``extra["earlier"]``, then this one). Empty for one cycle."""
    earlier = trained.extra.get("earlier") or []
    if not earlier:
        return ""
    lines = ["| cycle | starts from | recipe | steps | hours | Set5 at its end (x2 / x3 / x4) | MLflow runs |",
             "|---|---|---|---|---|---|---|"]
    parts = [*earlier, {"train_config": trained.train_config, "history": trained.history,
                        "elapsed_s": trained.position.elapsed_s, "mlflow_runs": trained.extra.get("mlflow_runs", []),
                        "steps": trained.steps_done}]
    for number, part in enumerate(parts, start=1):
        tc, last = part["train_config"], (part["history"] or [{}])[-1]
        source = earlier[number - 2] if number > 1 else None  # the release this cycle was warm-started from
        start = (f"cycle {number - 1}'s weights (`{source['from']}`, sha256 {source['sha256'][:12]})" if source
                 else "random init")
        recipe = (f"{tc.get('optimizer')} {tc.get('lr')}, {tc.get('lr_schedule')} to {tc.get('min_lr')}, "
                  f"{tc.get('epochs')} x {tc.get('steps_per_epoch')} steps of {tc.get('batch_size')}, {tc.get('loss')}"
                  + (f", ema {tc['ema_decay']}" if tc.get("ema_decay") else ""))
        steps = part.get("steps")
        if steps is None:
            steps = int(part.get("epoch", 0)) * int(tc.get("steps_per_epoch") or 0) + int(part.get("step", 0))
        val = " / ".join(f"{last[k]:.2f}" for k in sorted(last) if k.startswith("val_psnr_x")) or "-"
        lines.append(f"| {number} | {start} | {recipe} | {steps:,} | {_hours(float(part.get('elapsed_s', 0.0)))} | "
                     f"{val} | {len(part.get('mlflow_runs') or [])} |")
    total = sum(float(part.get("elapsed_s", 0.0)) for part in parts)
    return ("\n\n## The chain of trainings\n\nThese weights are the last of several cycles, each warm-started from "
            "the one before (`python -m vdsr.release warm-start --new-cycle`; a fresh optimizer each time), "
            f"{_hours(total)} of training in all:\n\n" + "\n".join(lines))


def averaging_text(history: list[dict[str, float]], weights: str | None = None) -> str:
    """Raw against averaged weights after each epoch (Set5), when the recipe kept a moving average;
    ``weights``: which of the two were released (``Trained.extra["weights"]``; "raw" or the average)."""
    rows = [row for row in history if any(k.startswith("val_psnr_raw_x") for k in row)]
    if not rows:
        return ""
    scales = sorted(k.removeprefix("val_psnr_raw_") for k in rows[0] if k.startswith("val_psnr_raw_x"))
    lines = ["| epoch | averaged weights " + " / ".join(scales) + " | raw weights | averaged minus raw |",
             "|---|---|---|---|"]
    for row in rows:
        avg = [row[f"val_psnr_{s}"] for s in scales]
        raw = [row[f"val_psnr_raw_{s}"] for s in scales]
        lines.append(f"| {int(row['epoch'])} | {' / '.join(f'{v:.2f}' for v in avg)} | "
                     f"{' / '.join(f'{v:.2f}' for v in raw)} | {' / '.join(f'{a - r:+.3f}' for a, r in zip(avg, raw))} |")
    released = ("the released weights are the raw ones (`python -m vdsr.release publish --weights raw`), the "
                "average being below them at the end of this run" if weights == "raw" else
                "the released weights are the averaged ones")
    return ("\n\n## Weight averaging\n\nThe recipe keeps a moving average of the weights (`ema_decay`); "
            f"{released}. Set5 validation of both, after each epoch:\n\n" + "\n".join(lines))


def results_rows(scores: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    """The Markdown table (ours beside bicubic and the paper) and which targets are reached."""
    lines = ["| set | scale | bicubic (ours) | SRCNN (paper) | VDSR (paper) | **this model** | vs SRCNN | vs VDSR |",
             "|---|---|---|---|---|---|---|---|"]
    must, goal, moonshot = True, True, True
    for dataset, by_scale in scores["model"].items():
        for scale, ours in by_scale.items():
            ref = paper.TABLE3[dataset][scale]
            bicubic = scores["bicubic"][dataset][scale]
            vs_srcnn, vs_vdsr = ours["psnr"] - ref["srcnn"][0], ours["psnr"] - ref["vdsr"][0]
            lines.append(f"| {dataset} | {scale} | {bicubic['psnr']:.2f} / {bicubic['ssim']:.4f} | "
                         f"{ref['srcnn'][0]:.2f} / {ref['srcnn'][1]:.4f} | {ref['vdsr'][0]:.2f} / {ref['vdsr'][1]:.4f} | "
                         f"**{ours['psnr']:.2f} / {ours['ssim']:.4f}** | {vs_srcnn:+.2f} | {vs_vdsr:+.2f} |")
            if dataset in MUST_SETS:
                must &= vs_srcnn > 0
            if dataset == "Set5":
                goal &= ours["psnr"] >= VDSR_91[scale]
                moonshot &= vs_vdsr >= 0
    missing = [s for s in MUST_SETS if s not in scores["model"]]
    return "\n".join(lines), {"must": must and not missing, "goal": goal and "Set5" in scores["model"],
                              "moonshot": moonshot and "Set5" in scores["model"]}


CELLS = ("x2", "x3", "x4")


def _below(table: dict[str, Any], reference: dict[str, dict[str, float]], strict: bool = False) -> list[str]:
    """The cells of ``reference`` ({set: {scale: psnr}}) that ``table`` misses or does not reach, as published
    (both rounded to 0.01 dB); ``strict``: equal is not enough."""
    short = []
    for dataset, by_scale in reference.items():
        for scale, target in by_scale.items():
            ours = table.get(dataset, {}).get(scale)
            value = round(ours["psnr"], 2) if ours else None
            if value is None or value < round(target, 2) or (strict and value == round(target, 2)):
                short.append(f"{dataset} {scale} {'-' if value is None else f'{value:.2f}'} vs {target:.2f}")
    return short


def continuation_targets(scores: dict[str, Any], previous: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """The targets of a release continued from a shipped one, each with the cells that miss it (none: reached).

    Must: every cell of Set5, Set14 and B100 at or above the release it continues (``previous``, that
    release's eval.json ``model`` table), and Set5 above both GPU reimplementations
    (:data:`vdsr.paper.GPU_REIMPLEMENTATIONS`) at every scale. Goal: at or above the paper's VDSR in all
    12 cells. Moonshot: the x8 self-ensemble at or above twtygqyy's weights on Set5, Set14 and B100.
    """
    before = {d: {s: previous[d][s]["psnr"] for s in CELLS} for d in MUST_SETS if d in previous}
    best_gpu = {"Set5": {s: max(paper.REIMPLEMENTATIONS[name]["Set5"][s] for name in paper.GPU_REIMPLEMENTATIONS)
                         for s in CELLS}}
    vdsr = {d: {s: paper.TABLE3[d][s]["vdsr"][0] for s in CELLS} for d in paper.TABLE3}
    model, plus = scores["model"], scores.get("self_ensemble") or {}
    gpu_names = " and ".join(paper.GPU_REIMPLEMENTATIONS)
    return [
        ((f"must, every cell of {', '.join(MUST_SETS)} at or above the release it continues, and Set5 above "
          f"{gpu_names} at every scale ({' / '.join(f'{v:.2f}' for v in best_gpu['Set5'].values())})"),
         _below(model, before) + _below(model, best_gpu, strict=True)),
        ("goal, at or above the paper's VDSR in all 12 cells (four sets, three scales)", _below(model, vdsr)),
        ("moonshot, VDSR+ (x8 self-ensemble) at or above twtygqyy's weights on Set5, Set14 and B100",
         _below(plus, paper.REIMPLEMENTATIONS["twtygqyy"])),
    ]


def srcnn_targets(scores: dict[str, Any], cells: tuple[str, ...] = CELLS) -> list[tuple[str, list[str]]]:
    """The targets of an SRCNN release, each with the cells that miss it (none: reached): must, Set5
    within :data:`SRCNN_MUST_DB` of the paper's SRCNN at every scale; goal, at or above it. ``cells``:
    the scales the release is for (a single-scale release is held to its own scale's targets)."""
    srcnn = {"Set5": {s: paper.TABLE3["Set5"][s]["srcnn"][0] for s in cells}}
    must = {"Set5": {s: round(v - SRCNN_MUST_DB, 2) for s, v in srcnn["Set5"].items()}}
    return [
        (f"must, Set5 within {SRCNN_MUST_DB} dB of the paper's SRCNN at every scale "
         f"({' / '.join(f'{v:.2f}' for v in must['Set5'].values())})", _below(scores["model"], must)),
        (f"goal, Set5 at or above the paper's SRCNN ({' / '.join(f'{v:.2f}' for v in srcnn['Set5'].values())})",
         _below(scores["model"], srcnn)),
    ]


SRCNN_SETTING = (
    "Which SRCNN this is: the paper's SRCNN column is Dong et al.'s (ECCV 2014 / TPAMI 2016) 9-5-5 models, "
    "one per scale, trained without padding on ImageNet. This one is a single model for x2, x3 and x4, "
    "zero-padded, trained on VDSR's data (the 291 images, the same patches and degradation as the VDSR "
    "release): the same-data baseline of Table 3, not a copy of Dong et al.'s training.")
SRCNN_PER_SCALE_SETTING = (
    "Which SRCNN this is: the paper's SRCNN column is Dong et al.'s (ECCV 2014 / TPAMI 2016) 9-5-5 models, "
    "one per scale, trained without padding on ImageNet. This one is, like theirs, a model for one scale "
    "({scale}) only, but zero-padded and trained on VDSR's data (the {scale} patches of the 291 images, the "
    "same degradation as the VDSR release): Dong et al.'s per-scale setting on Table 3's training data, "
    "not a copy of their ImageNet training. Its siblings for the other scales are released beside it.")


def targets_text(scores: dict[str, Any], reached: dict[str, bool], previous: dict[str, Any] | None,
                 sets: tuple[str, ...], kind: str = "vdsr", cells: tuple[str, ...] = CELLS) -> str:
    """The card's targets: an SRCNN release's (``kind`` srcnn, :func:`srcnn_targets`); the first CPU
    VDSR release's (``reached`` from :func:`results_rows`), or, for a release continued from a
    shipped one (``previous``: its eval.json ``model`` table), :func:`continuation_targets`. ``cells``:
    the scales the release is for."""
    if kind == "srcnn":
        lines = [f"- {text}: **{_yes(not short)}**" + (f" (short: {'; '.join(short)})" if short else "")
                 for text, short in srcnn_targets(scores, cells)]
        setting = SRCNN_SETTING if len(cells) > 1 else SRCNN_PER_SCALE_SETTING.format(scale=cells[0])
        return (f"Targets of the SRCNN release{_missing(scores, sets)} (PSNR as published, to 0.01 dB):\n\n"
                + "\n".join(lines) + "\n\n" + setting)
    if previous is None:
        return f"""Targets of the CPU release{_missing(scores, sets)}:

- must, above the paper's SRCNN on Set5, Set14 and B100 at every scale: **{_yes(reached['must'])}**
- goal, the paper's 91-image VDSR on Set5 (37.06 / 33.27 / 30.95): **{_yes(reached['goal'])}**
- moonshot, the paper's VDSR on Set5 (37.53 / 33.66 / 31.35): **{_yes(reached['moonshot'])}**"""
    lines = [f"- {text}: **{_yes(not short)}**" + (f" (short: {'; '.join(short)})" if short else "")
             for text, short in continuation_targets(scores, previous)]
    return (f"Targets of this release, continued from the one it replaces{_missing(scores, sets)} (PSNR as published, "
            "to 0.01 dB):\n\n" + "\n".join(lines))


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def write_card(path: Path, trained: Trained, scores: dict[str, Any], prov: dict[str, Any], model_path: Path,
               digest: str, *, sets: tuple[str, ...], curve: str = "val_psnr.png",
               previous: dict[str, Any] | None = None) -> None:
    """Write ``MODEL_CARD.md`` (atomically) for the weights ``model_path`` (sha256 ``digest``);
    ``sets``: the release's test sets (those ``scores`` lacks are named as not evaluated);
    ``curve``: the name of the validation curve beside it; ``previous``: the ``model`` table of the
    release these weights continue (its targets are then :func:`continuation_targets`)."""
    table, reached = results_rows(scores)
    config, tc = trained.config, trained.train_config
    status = "finished" if trained.finished else f"in progress: {trained.progress()}"
    done = trained.steps_done
    patches = (f"{done * int(tc['batch_size']):,} patches seen" if done is not None else
               "patches seen not recorded (a one-pass epoch, `steps_per_epoch: 0`, of a checkpoint from "
               "before the steps per epoch were recorded)")
    last = trained.history[-1] if trained.history else {}
    prepare = prov.get("prepare") or {}
    cells = tuple(f"x{s}" for s in prepare.get("scales") or (2, 3, 4))
    title, architecture, use = _describe(config, model_path.name, cells)
    shown = "val_psnr_raw_" if _validated(trained) else "val_psnr_"  # the validation of the weights released
    runs = prov["runs"]
    run_lines = [
        f"| `{run_id}` | {info.get('name', '?')} | {_when(info.get('start'))} | {_when(info.get('end'))} | "
        f"{info.get('status', '?')} | {info.get('git.commit', '?')[:10]} | {info.get('runtime.device', '?')}, "
        f"{info.get('runtime.precision', '?')}{', channels_last' if info.get('runtime.channels_last') == 'true' else ''} |"
        for run_id, info in runs.items()
    ]
    warm = trained.extra.get("warm_starts") or []
    recipe_notes = RECIPE_NOTES / f"{prov['preset']}.md" if prov.get("preset") else None
    size_mb = model_path.stat().st_size / 1e6
    trained_on = (f"{' + '.join(prepare.get('train_sets', ['?']))}, {prepare.get('patch_size', '?')}x"
                  f"{prepare.get('patch_size', '?')} patches at {'/'.join(f'x{s}' for s in prepare.get('scales', []))}")
    text = f"""# {title}, trained on a CPU (`{prov.get('preset') or 'custom recipe'}`)

{use} Status: **{status}**. This card is written by `python -m vdsr.release publish`
({prov['published']}{_scored(prov)}); do not edit it by hand.

| | |
|---|---|
| file | `pretrained/{model_path.name}` ({size_mb:.1f} MB, sha256 `{digest}`), `torch.load(weights_only=True)` |
| model | {architecture}, {"one model for " + ", ".join(cells) if len(cells) > 1 else "for " + cells[0] + " only"} |
| input / output | Y of BT.601 (MATLAB `rgb2ycbcr`) / 255, bicubic-upscaled (MATLAB `imresize`); Cb/Cr bicubic |
| trained on | {trained_on} (params.yaml `prepare`), {patches} |
| training time | {_hours(trained.position.elapsed_s)} of training and validation (runs summed, up to the last checkpoint){_earlier_hours(trained)} |
| machine | {prov['machine']} |
| data | train.h5 + val.h5 sha256 `{prov['data_id']}` |

## Results

PSNR (dB) / SSIM on Y, `scale` pixels shaved, evaluated in fp32 with this project's code (the
bicubic column reproduces the paper's to 0.01 dB where the image sets are the same). The paper's
columns are its Table 3 (291 training images, 80 epochs on a GPU).

{table}{plus_rows(scores, config.name)}

{targets_text(scores, reached, previous, sets, config.name, cells)}

![validation PSNR against training time]({curve})

Validation (Set5, after each epoch) at the last epoch, {int(last.get('epoch', 0))}{_validated(trained)}:
{', '.join(f"{k.removeprefix(shown)} {v:.2f} dB" for k, v in last.items() if k.startswith(shown + 'x')) or '-'}.{_after_epoch(trained.position.step)}

## How it was trained

`make {prov.get('preset') or 'release-cpu'}` (`presets/{prov.get('preset')}.yaml` applied to `params.yaml` with `dvc exp run -S`),
in resumed runs: each stop writes a checkpoint, the next run continues it exactly.
{_warm_text(warm)}{chain_text(trained, prov)}{averaging_text(trained.history, trained.extra.get("weights"))}

Recipe (`train.{config.name}` as trained):

```yaml
{yaml.safe_dump(tc, sort_keys=False).strip()}
```

MLflow runs of this training (oldest first; the MLflow store of the training workspace):

| run | name | start (UTC) | end (UTC) | status | commit | device, precision |
|---|---|---|---|---|---|---|
{chr(10).join(run_lines) or '| - | | | | | | |'}

Data (md5 of DVC's `dvc.lock` in the training workspace):

{chr(10).join(f"- `{key.removeprefix('dvc.md5.')}`: `{value}`" for key, value in sorted(prov['data'].items())) or '- (no dvc.lock)'}

{recipe_notes.read_text().strip() if recipe_notes and recipe_notes.is_file() else ''}
"""
    write_text_atomic(path, text)


def _validated(trained: Trained) -> str:
    """Which weights the last validation line is of, when a release took the raw ones."""
    last = trained.history[-1] if trained.history else {}
    if trained.extra.get("weights") == "raw" and any(k.startswith("val_psnr_raw_x") for k in last):
        return ", of the raw weights released"
    return ""


def _scored(prov: dict[str, Any]) -> str:
    """When ``python -m vdsr.release score`` last added scores of the same weights, if it did."""
    return f"; scores added by `python -m vdsr.release score` {prov['scored']}" if prov.get("scored") else ""


def _earlier_hours(trained: Trained) -> str:
    earlier = trained.extra.get("earlier") or []
    if not earlier:
        return ""
    before = sum(float(part.get("elapsed_s", 0.0)) for part in earlier)
    return f", after {_hours(before)} of the earlier cycles it was warm-started from (the chain below)"


def _describe(config: ModelConfig, file_name: str, cells: tuple[str, ...] = CELLS) -> tuple[str, str, str]:
    """Title, architecture and use of the card, for the model kind (``config.name``) and the scales
    it is for (``cells``)."""
    if config.name == "vdsr":
        return (f"VDSR {config.depth}x{config.width}",
                f"VDSR: {config.depth} conv layers 3x3x{config.width} + ReLU, residual (input + output)",
                "The released weights of this project: `vdsr upscale` and `vdsr evaluate` use them when `--model`\n"
                "is omitted.")
    architecture = (f"SRCNN 9-5-5: conv 9x9x{config.width}, 5x5x{config.width // 2}, 5x5x1, ReLU after the first "
                    "two, zero-padded, no residual (maps the bicubic input to HR)")
    title = f"SRCNN 9-5-5 ({config.width}-{config.width // 2})"
    if len(cells) == 1:
        scale = cells[0].removeprefix("x")
        return (f"{title} for x{scale}", architecture,
                (f"The project's per-scale SRCNN baseline for x{scale}: `vdsr upscale --model pretrained/{file_name} "
                 f"--scale {scale}`\nand `vdsr evaluate --model pretrained/{file_name} --scales {scale}` use it "
                 "(another scale is refused)."))
    return (title, architecture,
            (f"The project's SRCNN baseline: `vdsr upscale --model pretrained/{file_name}` and `vdsr evaluate\n"
             f"--model pretrained/{file_name}` use it."))


def _missing(scores: dict[str, Any], sets: tuple[str, ...]) -> str:
    missing = [name for name in sets if name not in scores["model"]]
    return f" ({', '.join(missing)} not evaluated for this release)" if missing else ""


def _after_epoch(steps: int) -> str:
    """Why the table's Set5 can differ from the last validation: the run stopped ``steps`` into the next epoch."""
    if not steps:
        return ""
    return (f"\nThe released weights are the checkpoint's, {steps:,} steps after that epoch's end (where the run was"
            "\nstopped), so their Set5 scores in the table can differ from this validation by about 0.1 dB.")


def _yes(flag: bool) -> str:
    return "reached" if flag else "not reached"


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _warm_text(warm: list[dict[str, Any]]) -> str:
    if not warm:
        return "Trained from scratch, without a warm start."
    return "Warm starts (a new machine without the checkpoint; `python -m vdsr.release warm-start`): " + "; ".join(
        f"from `{w['from']}` (sha256 {w['sha256'][:12]}) at {w['at']}, optimizer state {w['optimizer']}" for w in warm
    ) + "."
